//! Generates the gRPC code for `proto/identity.proto` and
//! `proto/discovery.proto` with the vendored `protoc`, so a fresh machine
//! needs no system protobuf compiler.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let includes = [PathBuf::from("proto"), protoc_bin_vendored::include_path()?];
    tonic_prost_build::configure()
        // The request carries a bearer token: its `Debug` is written by hand in lib.rs.
        .skip_debug(["palisade.identity.v1.CertifyRequest"])
        .compile_with_config(
            config,
            &[
                PathBuf::from("proto/identity.proto"),
                PathBuf::from("proto/discovery.proto"),
            ],
            &includes,
        )?;
    println!("cargo:rerun-if-changed=proto/identity.proto");
    println!("cargo:rerun-if-changed=proto/discovery.proto");
    Ok(())
}
