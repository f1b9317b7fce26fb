//! State machines for jobs, builds and agents.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} a {kind} that is {from}")]
pub struct TransitionError {
    pub kind: &'static str,
    pub from: &'static str,
    pub action: &'static str,
}

macro_rules! string_enum {
    ($name:ident, $kind:literal, { $($variant:ident => $s:literal),+ $(,)? }) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $s),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($s => Ok($name::$variant),)+
                    other => Err(format!("unknown {} state `{}`", $kind, other)),
                }
            }
        }
    };
}

string_enum!(JobState, "job", {
    Waiting => "waiting",
    Scheduled => "scheduled",
    Assigned => "assigned",
    Accepted => "accepted",
    Running => "running",
    Passed => "passed",
    Failed => "failed",
    Canceling => "canceling",
    Canceled => "canceled",
    Skipped => "skipped",
});

string_enum!(BuildState, "build", {
    Scheduled => "scheduled",
    Running => "running",
    Passed => "passed",
    Failed => "failed",
    Canceled => "canceled",
});

string_enum!(AgentState, "agent", {
    Connected => "connected",
    Lost => "lost",
    Disconnected => "disconnected",
});

/// What can happen to a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobAction {
    /// Every dependency passed.
    Unblock,
    /// A dependency failed, was canceled or skipped.
    Skip,
    Assign,
    /// The assignment was not accepted in time, or the agent went away before accepting.
    ReturnToQueue,
    Accept,
    Start,
    Finish {
        exit_status: i32,
    },
    Cancel,
    /// The agent holding the job was lost or disconnected.
    AgentGone,
}

impl JobAction {
    pub fn name(self) -> &'static str {
        match self {
            JobAction::Unblock => "unblock",
            JobAction::Skip => "skip",
            JobAction::Assign => "assign",
            JobAction::ReturnToQueue => "return to queue",
            JobAction::Accept => "accept",
            JobAction::Start => "start",
            JobAction::Finish { .. } => "finish",
            JobAction::Cancel => "cancel",
            JobAction::AgentGone => "fail for a lost agent",
        }
    }
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Passed | JobState::Failed | JobState::Canceled | JobState::Skipped
        )
    }

    /// States in which the job occupies an agent.
    pub fn holds_agent(self) -> bool {
        matches!(
            self,
            JobState::Assigned | JobState::Accepted | JobState::Running | JobState::Canceling
        )
    }

    /// A terminal state that makes dependents skip.
    pub fn blocks_dependents(self) -> bool {
        matches!(
            self,
            JobState::Failed | JobState::Canceled | JobState::Skipped
        )
    }

    pub fn transition(self, action: JobAction) -> Result<JobState, TransitionError> {
        use JobAction as A;
        use JobState as S;
        let next = match (self, action) {
            (S::Waiting, A::Unblock) => S::Scheduled,
            (S::Waiting, A::Skip) => S::Skipped,
            (S::Scheduled, A::Assign) => S::Assigned,
            (S::Assigned, A::ReturnToQueue) => S::Scheduled,
            (S::Assigned, A::Accept) => S::Accepted,
            (S::Accepted, A::Start) => S::Running,
            (S::Accepted | S::Running, A::Finish { exit_status }) => {
                if exit_status == 0 {
                    S::Passed
                } else {
                    S::Failed
                }
            }
            (S::Canceling, A::Finish { .. }) => S::Canceled,
            (S::Waiting | S::Scheduled | S::Assigned, A::Cancel) => S::Canceled,
            (S::Accepted | S::Running, A::Cancel) => S::Canceling,
            (S::Assigned, A::AgentGone) => S::Scheduled,
            (S::Accepted | S::Running, A::AgentGone) => S::Failed,
            (S::Canceling, A::AgentGone) => S::Canceled,
            (from, action) => {
                return Err(TransitionError {
                    kind: "job",
                    from: from.as_str(),
                    action: action.name(),
                })
            }
        };
        Ok(next)
    }
}

impl BuildState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            BuildState::Passed | BuildState::Failed | BuildState::Canceled
        )
    }

    /// Legal build transitions; the build's state is otherwise derived from its jobs.
    pub fn can_become(self, next: BuildState) -> bool {
        use BuildState as B;
        matches!(
            (self, next),
            (B::Scheduled, B::Running)
                | (
                    B::Scheduled | B::Running,
                    B::Passed | B::Failed | B::Canceled
                )
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentAction {
    Heartbeat,
    Lose,
    Disconnect,
}

impl AgentState {
    pub fn transition(self, action: AgentAction) -> Result<AgentState, TransitionError> {
        use AgentAction as A;
        use AgentState as S;
        match (self, action) {
            (S::Connected, A::Heartbeat) => Ok(S::Connected),
            (S::Connected, A::Lose) => Ok(S::Lost),
            (S::Connected | S::Lost, A::Disconnect) => Ok(S::Disconnected),
            (from, action) => Err(TransitionError {
                kind: "agent",
                from: from.as_str(),
                action: match action {
                    A::Heartbeat => "heartbeat",
                    A::Lose => "lose",
                    A::Disconnect => "disconnect",
                },
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all_actions() -> Vec<JobAction> {
        vec![
            JobAction::Unblock,
            JobAction::Skip,
            JobAction::Assign,
            JobAction::ReturnToQueue,
            JobAction::Accept,
            JobAction::Start,
            JobAction::Finish { exit_status: 0 },
            JobAction::Finish { exit_status: 1 },
            JobAction::Cancel,
            JobAction::AgentGone,
        ]
    }

    /// The full table of legal job transitions; everything else must be rejected.
    fn expected(from: JobState, action: JobAction) -> Option<JobState> {
        use JobAction as A;
        use JobState as S;
        Some(match (from, action) {
            (S::Waiting, A::Unblock) => S::Scheduled,
            (S::Waiting, A::Skip) => S::Skipped,
            (S::Waiting, A::Cancel) => S::Canceled,
            (S::Scheduled, A::Assign) => S::Assigned,
            (S::Scheduled, A::Cancel) => S::Canceled,
            (S::Assigned, A::Accept) => S::Accepted,
            (S::Assigned, A::ReturnToQueue) => S::Scheduled,
            (S::Assigned, A::AgentGone) => S::Scheduled,
            (S::Assigned, A::Cancel) => S::Canceled,
            (S::Accepted, A::Start) => S::Running,
            (S::Accepted, A::Finish { exit_status: 0 }) => S::Passed,
            (S::Accepted, A::Finish { .. }) => S::Failed,
            (S::Accepted, A::Cancel) => S::Canceling,
            (S::Accepted, A::AgentGone) => S::Failed,
            (S::Running, A::Finish { exit_status: 0 }) => S::Passed,
            (S::Running, A::Finish { .. }) => S::Failed,
            (S::Running, A::Cancel) => S::Canceling,
            (S::Running, A::AgentGone) => S::Failed,
            (S::Canceling, A::Finish { .. }) => S::Canceled,
            (S::Canceling, A::AgentGone) => S::Canceled,
            _ => return None,
        })
    }

    #[test]
    fn every_job_transition_matches_the_table() {
        let mut legal = 0;
        for &from in JobState::ALL {
            for action in all_actions() {
                let got = from.transition(action).ok();
                assert_eq!(got, expected(from, action), "{from} + {action:?}");
                legal += usize::from(got.is_some());
            }
        }
        assert_eq!(legal, 21);
    }

    #[test]
    fn terminal_jobs_accept_nothing() {
        for &from in JobState::ALL.iter().filter(|s| s.is_terminal()) {
            for action in all_actions() {
                assert!(from.transition(action).is_err(), "{from} + {action:?}");
            }
        }
    }

    #[test]
    fn build_transitions() {
        use BuildState as B;
        for &from in BuildState::ALL {
            for &to in BuildState::ALL {
                let legal = matches!(
                    (from, to),
                    (B::Scheduled, B::Running)
                        | (B::Scheduled, B::Passed)
                        | (B::Scheduled, B::Failed)
                        | (B::Scheduled, B::Canceled)
                        | (B::Running, B::Passed)
                        | (B::Running, B::Failed)
                        | (B::Running, B::Canceled)
                );
                assert_eq!(from.can_become(to), legal, "{from} -> {to}");
            }
        }
    }

    #[test]
    fn agent_transitions() {
        use AgentAction as A;
        use AgentState as S;
        let table = [
            (S::Connected, A::Heartbeat, Some(S::Connected)),
            (S::Connected, A::Lose, Some(S::Lost)),
            (S::Connected, A::Disconnect, Some(S::Disconnected)),
            (S::Lost, A::Heartbeat, None),
            (S::Lost, A::Lose, None),
            (S::Lost, A::Disconnect, Some(S::Disconnected)),
            (S::Disconnected, A::Heartbeat, None),
            (S::Disconnected, A::Lose, None),
            (S::Disconnected, A::Disconnect, None),
        ];
        for (from, action, to) in table {
            assert_eq!(from.transition(action).ok(), to, "{from} + {action:?}");
        }
    }

    #[test]
    fn states_round_trip_through_strings() {
        for &s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>(), Ok(s));
        }
        for &s in BuildState::ALL {
            assert_eq!(s.as_str().parse::<BuildState>(), Ok(s));
        }
        for &s in AgentState::ALL {
            assert_eq!(s.as_str().parse::<AgentState>(), Ok(s));
        }
        assert!("nope".parse::<JobState>().is_err());
    }

    fn action_strategy() -> impl Strategy<Value = JobAction> {
        prop_oneof![
            Just(JobAction::Unblock),
            Just(JobAction::Skip),
            Just(JobAction::Assign),
            Just(JobAction::ReturnToQueue),
            Just(JobAction::Accept),
            Just(JobAction::Start),
            any::<i32>().prop_map(|exit_status| JobAction::Finish { exit_status }),
            Just(JobAction::Cancel),
            Just(JobAction::AgentGone),
        ]
    }

    proptest! {
        /// Any sequence of actions keeps a job inside the machine: once terminal it
        /// stays terminal, and it only holds an agent after an assignment.
        #[test]
        fn random_walks_stay_consistent(actions in proptest::collection::vec(action_strategy(), 0..40)) {
            let mut state = JobState::Waiting;
            let mut was_assigned = false;
            for action in actions {
                match state.transition(action) {
                    Ok(next) => {
                        prop_assert!(!state.is_terminal());
                        if next == JobState::Assigned { was_assigned = true; }
                        if next.holds_agent() { prop_assert!(was_assigned); }
                        if let JobAction::Finish { exit_status } = action {
                            if state != JobState::Canceling {
                                prop_assert_eq!(next == JobState::Passed, exit_status == 0);
                            }
                        }
                        state = next;
                    }
                    Err(e) => prop_assert_eq!(e.from, state.as_str()),
                }
            }
        }
    }
}
