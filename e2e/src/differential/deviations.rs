//! The disagreements with kube-proxy that are deliberate, each described in
//! `docs/deviations.md` under the heading given here.

use super::outcome::Disagreement;
use super::state::State;

/// A deliberate deviation: its heading in `docs/deviations.md`, and which
/// disagreements it covers.
pub struct Deviation {
    pub heading: &'static str,
    pub covers: fn(&Disagreement, &State) -> bool,
}

/// Every deliberate deviation a differential probe can show.
pub const KNOWN: &[Deviation] = &[];

/// The deviation covering `disagreement`, if it is a deliberate one.
pub fn known(disagreement: &Disagreement, state: &State) -> Option<&'static str> {
    KNOWN
        .iter()
        .find(|d| (d.covers)(disagreement, state))
        .map(|d| d.heading)
}
