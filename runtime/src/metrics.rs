//! What the two binaries' metrics share: closed label sets as types, and a
//! catalogue of every family a component registers.
//!
//! A label whose values form a closed set (a `reason`, a `result`, a
//! `direction`) is an enum implementing [`LabelValue`]: the compiler rejects
//! a misspelt value, and [`LabelValue::ALL`] lists every value so series can
//! start at zero and `docs/metrics.md` can be checked against the code.
//!
//! [`Families`] registers collectors and remembers, for each family, its
//! name, help, kind and labels with their value sets: the [`Family`] list a
//! component's `Metrics::describe()` returns. Registering through it is the
//! only way a family is created, so no family escapes the documentation test.

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, core::Collector,
};

/// A closed set of label values: an enum whose variants are the values.
///
/// Derive it with strum: `#[derive(Clone, Copy, PartialEq, Eq,
/// strum::IntoStaticStr, strum::VariantArray)]` and
/// `#[strum(serialize_all = "snake_case")]`; the blanket impl does the rest.
pub trait LabelValue: Copy + Eq + Into<&'static str> + strum::VariantArray + 'static {
    /// Every value, in declaration order.
    const ALL: &'static [Self] = <Self as strum::VariantArray>::VARIANTS;

    /// The label value as it appears in a series.
    fn as_str(self) -> &'static str {
        self.into()
    }

    /// Every value as text, in declaration order.
    fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|v| v.as_str()).collect()
    }
}

impl<T> LabelValue for T where T: Copy + Eq + Into<&'static str> + strum::VariantArray + 'static {}

/// How an attempt ended: the `result` label of renewals, reloads,
/// publications and handshakes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum Outcome {
    /// It worked.
    Success,
    /// It did not.
    Failure,
}

/// The kind of a metric family, as Prometheus' `# TYPE` line names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations in buckets.
    Histogram,
}

/// One label of a family and what values it takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    /// The label's name.
    pub name: &'static str,
    /// The closed set of values, or `None` for a label whose values come
    /// from configuration or authenticated peers (an identity, a port).
    pub values: Option<Vec<&'static str>>,
}

/// One registered metric family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Family {
    /// The full metric name.
    pub name: &'static str,
    /// The `# HELP` text.
    pub help: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// The labels, in the order series carry them.
    pub labels: Vec<Label>,
}

/// Registers a component's families on one [`Registry`] and describes them.
#[derive(Debug)]
pub struct Families<'r> {
    registry: &'r Registry,
    described: Vec<Family>,
}

// === impl Outcome ===

impl Outcome {
    /// `Success` when `ok`.
    pub fn of(ok: bool) -> Self {
        if ok { Self::Success } else { Self::Failure }
    }
}

// === impl Label ===

impl Label {
    /// A label whose values are the variants of `T`.
    pub fn closed<T: LabelValue>(name: &'static str) -> Self {
        Self::closed_with(name, T::names())
    }

    /// A label whose closed set is `values` (a set made of several enums).
    pub fn closed_with(name: &'static str, values: Vec<&'static str>) -> Self {
        Self {
            name,
            values: Some(values),
        }
    }

    /// A label whose values are not a closed set in the code; its docs say
    /// what bounds it.
    pub fn open(name: &'static str) -> Self {
        Self { name, values: None }
    }
}

// === impl Families ===

impl<'r> Families<'r> {
    /// Starts registering on `registry`.
    pub fn new(registry: &'r Registry) -> Self {
        Self {
            registry,
            described: Vec::new(),
        }
    }

    /// Every family registered so far.
    pub fn into_described(self) -> Vec<Family> {
        self.described
    }

    /// A counter family with labels.
    pub fn counter_vec(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: Vec<Label>,
    ) -> Result<IntCounterVec, prometheus::Error> {
        let names = label_names(&labels);
        let c = IntCounterVec::new(Opts::new(name, help), &names)?;
        self.add(c, name, help, Kind::Counter, labels)
    }

    /// A counter without labels.
    pub fn int_counter(
        &mut self,
        name: &'static str,
        help: &'static str,
    ) -> Result<IntCounter, prometheus::Error> {
        let c = IntCounter::new(name, help)?;
        self.add(c, name, help, Kind::Counter, Vec::new())
    }

    /// An integer gauge without labels.
    pub fn int_gauge(
        &mut self,
        name: &'static str,
        help: &'static str,
    ) -> Result<IntGauge, prometheus::Error> {
        let g = IntGauge::new(name, help)?;
        self.add(g, name, help, Kind::Gauge, Vec::new())
    }

    /// An integer gauge family with labels.
    pub fn int_gauge_vec(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: Vec<Label>,
    ) -> Result<IntGaugeVec, prometheus::Error> {
        let names = label_names(&labels);
        let g = IntGaugeVec::new(Opts::new(name, help), &names)?;
        self.add(g, name, help, Kind::Gauge, labels)
    }

    /// A floating-point gauge without labels.
    pub fn gauge(
        &mut self,
        name: &'static str,
        help: &'static str,
    ) -> Result<Gauge, prometheus::Error> {
        let g = Gauge::new(name, help)?;
        self.add(g, name, help, Kind::Gauge, Vec::new())
    }

    /// A floating-point gauge family with labels.
    pub fn gauge_vec(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: Vec<Label>,
    ) -> Result<GaugeVec, prometheus::Error> {
        let names = label_names(&labels);
        let g = GaugeVec::new(Opts::new(name, help), &names)?;
        self.add(g, name, help, Kind::Gauge, labels)
    }

    /// A histogram without labels.
    pub fn histogram(
        &mut self,
        name: &'static str,
        help: &'static str,
        buckets: Vec<f64>,
    ) -> Result<Histogram, prometheus::Error> {
        let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
        self.add(h, name, help, Kind::Histogram, Vec::new())
    }

    /// A histogram family with labels.
    pub fn histogram_vec(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: Vec<Label>,
        buckets: Vec<f64>,
    ) -> Result<HistogramVec, prometheus::Error> {
        let names = label_names(&labels);
        let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &names)?;
        self.add(h, name, help, Kind::Histogram, labels)
    }

    fn add<C: Collector + Clone + 'static>(
        &mut self,
        collector: C,
        name: &'static str,
        help: &'static str,
        kind: Kind,
        labels: Vec<Label>,
    ) -> Result<C, prometheus::Error> {
        self.registry.register(Box::new(collector.clone()))?;
        self.described.push(Family {
            name,
            help,
            kind,
            labels,
        });
        Ok(collector)
    }
}

fn label_names(labels: &[Label]) -> Vec<&'static str> {
    labels.iter().map(|l| l.name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr, strum::VariantArray)]
    #[strum(serialize_all = "snake_case")]
    enum Colour {
        DeepRed,
        Blue,
    }

    #[test]
    fn label_values_are_snake_case_in_declaration_order() {
        assert_eq!(Colour::ALL, &[Colour::DeepRed, Colour::Blue]);
        assert_eq!(Colour::DeepRed.as_str(), "deep_red");
        assert_eq!(Colour::names(), ["deep_red", "blue"]);
        assert_eq!(Outcome::names(), ["success", "failure"]);
        assert_eq!(Outcome::of(false), Outcome::Failure);
    }

    #[test]
    fn families_register_and_describe_what_they_register() {
        let registry = Registry::new();
        let mut families = Families::new(&registry);
        let c = families
            .counter_vec(
                "x_total",
                "Xs.",
                vec![Label::closed::<Colour>("colour"), Label::open("who")],
            )
            .expect("a valid family");
        c.with_label_values(&["blue", "me"]).inc();
        families.int_gauge("y", "Y.").expect("a valid family");
        // The same name twice is refused, as the registry refuses it.
        assert!(families.int_gauge("y", "Y again.").is_err());
        let described = families.into_described();
        assert_eq!(described.len(), 2);
        assert_eq!(described[0].kind, Kind::Counter);
        assert_eq!(
            described[0].labels[0].values.as_deref(),
            Some(&["deep_red", "blue"][..])
        );
        assert_eq!(described[0].labels[1].values, None);
        assert_eq!(registry.gather().len(), 2);
    }
}
