//! Typed identifiers. Every id that crosses a public signature is one of these `Copy` newtypes,
//! displayed with a prefix (`job-12`, `w3`, `rank1`, `step40`) so logs and errors read plainly.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id {
    ($(#[$doc:meta])* $name:ident($inner:ty), $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

id!(
    /// A training job, numbered by the coordinator from 1.
    JobId(u64),
    "job-"
);
id!(
    /// A registered worker daemon, numbered by the coordinator from 1.
    WorkerId(u64),
    "w"
);
id!(
    /// A worker's position inside one job (0-based, dense).
    Rank(u32),
    "rank"
);
id!(
    /// A count of optimizer steps done (0 before the first step).
    Step(u64),
    "step"
);
id!(
    /// A pipeline stage (0-based).
    StageId(u32),
    "stage"
);

impl Step {
    /// The step after this one.
    #[must_use]
    pub fn next(self) -> Step {
        Step(self.0 + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_has_prefixes() {
        assert_eq!(JobId(12).to_string(), "job-12");
        assert_eq!(WorkerId(3).to_string(), "w3");
        assert_eq!(Rank(1).to_string(), "rank1");
        assert_eq!(Step(40).to_string(), "step40");
        assert_eq!(StageId(0).to_string(), "stage0");
    }
}
