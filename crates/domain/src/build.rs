//! How a build follows from its jobs, and which waiting jobs a finished job releases.

use crate::states::{BuildState, JobState};

/// A build's state as its jobs make it. `cancel_requested` is set once someone
/// canceled the build; it wins over failure once every job is terminal.
pub fn derive_build_state(
    current: BuildState,
    cancel_requested: bool,
    jobs: impl IntoIterator<Item = JobState>,
) -> BuildState {
    if current.is_terminal() {
        return current;
    }
    let mut all_terminal = true;
    let mut all_passed = true;
    let mut started = false;
    let mut any = false;
    for state in jobs {
        any = true;
        all_terminal &= state.is_terminal();
        all_passed &= state == JobState::Passed;
        started |= matches!(
            state,
            JobState::Accepted
                | JobState::Running
                | JobState::Canceling
                | JobState::Passed
                | JobState::Failed
        );
    }
    if !any {
        return if cancel_requested {
            BuildState::Canceled
        } else {
            current
        };
    }
    if all_terminal {
        if cancel_requested {
            BuildState::Canceled
        } else if all_passed {
            BuildState::Passed
        } else {
            BuildState::Failed
        }
    } else if started && current == BuildState::Scheduled {
        BuildState::Running
    } else {
        current
    }
}

/// One job of a build as propagation sees it: its state and the indices of the jobs it
/// depends on.
#[derive(Debug, Clone)]
pub struct PropagationJob {
    pub state: JobState,
    pub depends_on: Vec<usize>,
}

/// Returns the waiting jobs that must change, with their new state: `scheduled` when
/// every dependency passed, `skipped` when one failed, was canceled or was skipped.
/// Skips cascade, so this runs to a fixpoint. Pure and idempotent: running it again
/// on the result changes nothing.
pub fn plan_propagation(jobs: &[PropagationJob]) -> Vec<(usize, JobState)> {
    let mut states: Vec<JobState> = jobs.iter().map(|j| j.state).collect();
    let mut changes = Vec::new();
    loop {
        let mut changed = false;
        for (i, job) in jobs.iter().enumerate() {
            if states[i] != JobState::Waiting {
                continue;
            }
            let deps = job
                .depends_on
                .iter()
                .filter_map(|&d| states.get(d).copied());
            let mut all_passed = true;
            let mut blocked = false;
            for dep in deps {
                all_passed &= dep == JobState::Passed;
                blocked |= dep.blocks_dependents();
            }
            let next = if blocked {
                JobState::Skipped
            } else if all_passed {
                JobState::Scheduled
            } else {
                continue;
            };
            states[i] = next;
            changes.push((i, next));
            changed = true;
        }
        if !changed {
            return changes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use JobState as J;

    fn job(state: JobState, deps: &[usize]) -> PropagationJob {
        PropagationJob {
            state,
            depends_on: deps.to_vec(),
        }
    }

    #[test]
    fn build_state_follows_jobs() {
        use BuildState as B;
        assert_eq!(
            derive_build_state(B::Scheduled, false, [J::Scheduled, J::Waiting]),
            B::Scheduled
        );
        assert_eq!(
            derive_build_state(B::Scheduled, false, [J::Accepted, J::Waiting]),
            B::Running
        );
        assert_eq!(
            derive_build_state(B::Running, false, [J::Passed, J::Passed]),
            B::Passed
        );
        assert_eq!(
            derive_build_state(B::Running, false, [J::Passed, J::Failed, J::Skipped]),
            B::Failed
        );
        assert_eq!(
            derive_build_state(B::Running, true, [J::Canceling, J::Canceled]),
            B::Running
        );
        assert_eq!(
            derive_build_state(B::Running, true, [J::Failed, J::Canceled]),
            B::Canceled
        );
        assert_eq!(derive_build_state(B::Passed, true, [J::Waiting]), B::Passed);
    }

    #[test]
    fn unblocks_when_all_dependencies_passed() {
        let jobs = [
            job(J::Passed, &[]),
            job(J::Running, &[]),
            job(J::Waiting, &[0, 1]),
        ];
        assert!(plan_propagation(&jobs).is_empty());
        let jobs = [
            job(J::Passed, &[]),
            job(J::Passed, &[]),
            job(J::Waiting, &[0, 1]),
        ];
        assert_eq!(plan_propagation(&jobs), vec![(2, J::Scheduled)]);
    }

    #[test]
    fn skips_cascade_down_the_graph() {
        let jobs = [
            job(J::Failed, &[]),
            job(J::Waiting, &[0]),
            job(J::Waiting, &[1]),
            job(J::Waiting, &[]),
        ];
        let plan = plan_propagation(&jobs);
        assert!(plan.contains(&(1, J::Skipped)));
        assert!(plan.contains(&(2, J::Skipped)));
        // A waiting job with no dependencies is released too.
        assert!(plan.contains(&(3, J::Scheduled)));
    }

    #[test]
    fn propagation_is_idempotent() {
        let mut jobs = vec![
            job(J::Canceled, &[]),
            job(J::Waiting, &[0]),
            job(J::Waiting, &[1]),
        ];
        for (i, s) in plan_propagation(&jobs) {
            jobs[i].state = s;
        }
        assert!(plan_propagation(&jobs).is_empty());
    }
}
