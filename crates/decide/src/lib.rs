//! The decisions a connection meets on Envoy's data path, as pure functions over the loaded
//! configuration: which listener takes it ([`listener`]), which listener filters run and what they
//! find, which filter chain serves it ([`filter_chain`]), which virtual host, route and action a
//! request gets ([`router`]), and which hosts and transport socket a cluster offers ([`cluster`]).
//! The proxy and `pilotfish trace` call the same functions; each returns its answer and, for the
//! explanation, what it tried and why each alternative lost ([`Reason`]).

pub mod cluster;
pub mod explain;
pub mod filter_chain;
pub mod listener;
pub mod matcher;
pub mod router;
pub mod trace;

/// One thing a decision considered, and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason {
    /// What was considered: `filter_chains[3] (0.0.0.0_8080)`, `virtual host 'default'`.
    pub subject: String,
    pub verdict: Verdict,
    /// Why, in a sentence fragment: `destination port 8080 != 8070`.
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Chosen,
    Rejected,
    /// Not considered because an earlier, more specific candidate won.
    Skipped,
    /// A fact the decision established (a listener filter's finding).
    Note,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Chosen => "chosen",
            Verdict::Rejected => "rejected",
            Verdict::Skipped => "skipped",
            Verdict::Note => "note",
        }
    }
}

impl Reason {
    pub fn new(subject: impl Into<String>, verdict: Verdict, detail: impl Into<String>) -> Reason {
        Reason {
            subject: subject.into(),
            verdict,
            detail: detail.into(),
        }
    }
}
