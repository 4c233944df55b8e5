//! TEMPORARY STUB until the capture module lands.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CaptureConfig {
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub proxy_uid: u32,
    pub exclude_outbound_ports: Vec<u16>,
    pub exclude_inbound_ports: Vec<u16>,
    pub ipv6: bool,
}
#[derive(Debug, thiserror::Error)]
#[error("stub")]
pub struct CaptureError;
pub enum Family {
    V4,
    V6,
}
pub fn rules(_c: &CaptureConfig, _f: Family) -> Result<String, CaptureError> {
    Err(CaptureError)
}
pub fn install(_c: &CaptureConfig) -> Result<(), CaptureError> {
    Err(CaptureError)
}
pub fn remove(_c: &CaptureConfig) -> Result<(), CaptureError> {
    Err(CaptureError)
}
