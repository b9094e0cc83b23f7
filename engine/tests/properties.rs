//! Property tests: random definitions driven by a small simulator that plays
//! participants, the clock and (now and then) an operator, with replies that
//! come late, twice, or for attempts that never existed.
//!
//! The simulator keeps its own record of what happened (which actions
//! succeeded, timed out or failed for business reasons; which compensations
//! succeeded) and checks every command the engine issues against it, then
//! checks where each saga ends.

use std::time::Duration;

use chrono::{DateTime, Utc};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use serde_json::json;
use skald_engine::{
    Applied, CommandSpec, Ctx, EngineError, Event, Kind, Outcome, RetryPolicy, SagaDefinition, SagaState, SagaStatus,
    StepStatus, Transition, apply, start,
};

/// Events after which the simulator stops choosing at random and only
/// answers with successes and ticks (a saga must then finish).
const FORCE_BOUND: usize = 500;

#[derive(Debug, Clone)]
struct StepSpec {
    compensable: bool,
    max_attempts: u32,
    timeout_ms: u64,
}

/// What a participant answers.
#[derive(Debug, Clone, Copy)]
enum Said {
    Success,
    BusinessFailure,
    TransientFailure,
}

impl Said {
    fn outcome(self) -> Outcome {
        match self {
            Said::Success => Outcome::Success {
                data: json!({"ok": true}),
            },
            Said::BusinessFailure => Outcome::Failure {
                retryable: false,
                reason: "refused".into(),
            },
            Said::TransientFailure => Outcome::Failure {
                retryable: true,
                reason: "unavailable".into(),
            },
        }
    }
}

/// How long an attempt may wait behind a backlog in this model: longer than
/// some step timeouts (100 ms to 2 s) and shorter than others, so that both
/// a moved deadline and the cap are reached.
const MAX_QUEUE_WAIT: Duration = Duration::from_millis(3_000);

#[derive(Debug, Clone)]
enum Choice {
    /// The participant answers the command in flight.
    Answer(Said),
    /// A tick at or after `wake_at`, `late_ms` after it.
    Tick { late_ms: u64 },
    /// A tick before `wake_at` (when the clock allows one).
    EarlyTick,
    /// The sweeper's tick while the queues are behind
    /// ([`Event::QueueBacklog`]), `late_ms` after `wake_at`.
    Backlog { late_ms: u64 },
    /// A reply delivered earlier arrives again.
    Duplicate(Index),
    /// A reply for a command that is no longer in flight.
    Stale(Index, Said),
    /// A reply for an attempt that was never sent (`0` or past the last one).
    UnknownAttempt(Index, bool, u32),
    /// A reply naming a step the definition does not have.
    UnknownStep,
    /// Operator retry (accepted only when `STUCK`).
    Retry,
}

#[derive(Debug, Clone)]
struct Case {
    steps: Vec<StepSpec>,
    compensation_attempts: u32,
    compensation_timeout_ms: u64,
    /// Every compensation fails (until an operator retries at the very end).
    compensations_fail: bool,
    jitter: f64,
    /// Each event comes this many milliseconds after the one before.
    events: Vec<(Choice, u64)>,
    /// The operator tries to abort the saga before this event.
    abort_at: Option<usize>,
}

fn said() -> impl Strategy<Value = Said> {
    prop_oneof![
        Just(Said::Success),
        Just(Said::BusinessFailure),
        Just(Said::TransientFailure)
    ]
}

fn choice() -> impl Strategy<Value = Choice> {
    prop_oneof![
        6 => Just(Choice::Answer(Said::Success)),
        1 => Just(Choice::Answer(Said::BusinessFailure)),
        2 => Just(Choice::Answer(Said::TransientFailure)),
        3 => (0u64..2_000).prop_map(|late_ms| Choice::Tick { late_ms }),
        1 => Just(Choice::EarlyTick),
        2 => (0u64..2_000).prop_map(|late_ms| Choice::Backlog { late_ms }),
        1 => any::<Index>().prop_map(Choice::Duplicate),
        1 => (any::<Index>(), said()).prop_map(|(i, s)| Choice::Stale(i, s)),
        1 => (any::<Index>(), any::<bool>(), 0u32..3).prop_map(|(i, c, n)| Choice::UnknownAttempt(i, c, n)),
        1 => Just(Choice::UnknownStep),
        1 => Just(Choice::Retry),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    let step = (any::<bool>(), 1u32..=3, 100u64..2_000).prop_map(|(compensable, max_attempts, timeout_ms)| StepSpec {
        compensable,
        max_attempts,
        timeout_ms,
    });
    (
        prop::collection::vec(step, 1..=5),
        1u32..=4,
        100u64..2_000,
        prop::bool::weighted(0.25),
        0.0f64..1.0,
        prop::collection::vec((choice(), 0u64..1_500), 0..60),
        prop::option::weighted(0.2, 0usize..30),
    )
        .prop_map(
            |(steps, compensation_attempts, compensation_timeout_ms, compensations_fail, jitter, events, abort_at)| {
                Case {
                    steps,
                    compensation_attempts,
                    compensation_timeout_ms,
                    compensations_fail,
                    jitter,
                    events,
                    abort_at,
                }
            },
        )
}

fn definition(case: &Case) -> SagaDefinition {
    let retry = |max_attempts| RetryPolicy {
        max_attempts,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
        multiplier: 2.0,
    };
    let mut b = SagaDefinition::builder("random").compensation_retry(
        retry(case.compensation_attempts),
        Duration::from_millis(case.compensation_timeout_ms),
    );
    for (i, s) in case.steps.iter().enumerate() {
        b = b
            .step(&format!("s{i}"))
            .invoke(&format!("p{i}"), &format!("Do{i}"))
            .timeout(Duration::from_millis(s.timeout_ms))
            .retry(retry(s.max_attempts));
        if s.compensable {
            b = b.compensate(&format!("q{i}"), &format!("Undo{i}"));
        }
    }
    b.build().expect("generated definitions are valid")
}

fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_767_225_600, 0).expect("valid timestamp")
}

fn reply_to(cmd: &CommandSpec, said: Said) -> Event {
    Event::Reply {
        step: cmd.step.clone(),
        attempt: cmd.attempt,
        kind: cmd.kind,
        outcome: said.outcome(),
    }
}

struct Issued {
    cmd: CommandSpec,
    index: usize,
    deadline: DateTime<Utc>,
}

/// The simulator and its own record of what happened.
struct Sim {
    def: SagaDefinition,
    jitter: f64,
    compensations_fail: bool,
    now: DateTime<Utc>,
    state: SagaState,
    issued: Vec<Issued>,
    /// Index in `issued` of the command the engine waits for, if any.
    in_flight: Option<usize>,
    /// Replies the engine accepted.
    replies: Vec<Event>,
    succeeded: Vec<bool>,
    timed_out: Vec<bool>,
    aborted_in_flight: Vec<bool>,
    /// An operator aborted the saga.
    aborted: bool,
    business_failed: Vec<bool>,
    compensated: Vec<bool>,
    /// Compensation failures in a row of the step being compensated.
    compensation_failures: u32,
}

impl Sim {
    fn start(case: &Case) -> Result<Self, TestCaseError> {
        let def = definition(case);
        let n = def.steps().len();
        let now = t0();
        let t = start(
            &def,
            Ctx {
                now,
                jitter: case.jitter,
            },
        );
        let mut sim = Sim {
            def,
            jitter: case.jitter,
            compensations_fail: case.compensations_fail,
            now,
            state: t.state,
            issued: Vec::new(),
            in_flight: None,
            replies: Vec::new(),
            succeeded: vec![false; n],
            timed_out: vec![false; n],
            aborted_in_flight: vec![false; n],
            aborted: false,
            business_failed: vec![false; n],
            compensated: vec![false; n],
            compensation_failures: 0,
        };
        prop_assert_eq!(t.applied, Applied::Changed);
        prop_assert_eq!(t.commands.len(), 1, "start sends the first action");
        sim.record(t.commands)?;
        sim.check_state()?;
        Ok(sim)
    }

    fn apply(&self, event: Event) -> Result<Transition, EngineError> {
        apply(
            &self.def,
            self.state.clone(),
            event,
            Ctx {
                now: self.now,
                jitter: self.jitter,
            },
        )
    }

    /// Applies an event the engine must accept and act on.
    fn apply_changed(&mut self, event: Event) -> Result<Vec<CommandSpec>, TestCaseError> {
        let shown = format!("{event:?}");
        let t = self
            .apply(event)
            .map_err(|e| TestCaseError::fail(format!("{shown} was refused: {e}")))?;
        prop_assert_eq!(t.applied, Applied::Changed, "{} changed nothing", shown);
        self.state = t.state;
        Ok(t.commands)
    }

    /// Applies an event that must change nothing at all.
    fn expect_ignored(&self, event: Event) -> Result<(), TestCaseError> {
        let shown = format!("{event:?}");
        let t = self
            .apply(event)
            .map_err(|e| TestCaseError::fail(format!("{shown} was refused: {e}")))?;
        prop_assert!(matches!(t.applied, Applied::Ignored(_)), "{} was not ignored", shown);
        prop_assert!(t.commands.is_empty(), "{} issued {:?}", shown, t.commands);
        prop_assert_eq!(&t.state, &self.state, "{} changed the state", shown);
        Ok(())
    }

    fn step_index(&self, cmd: &CommandSpec) -> Result<usize, TestCaseError> {
        self.def
            .step_index(&cmd.step)
            .ok_or_else(|| TestCaseError::fail(format!("command for unknown step {cmd:?}")))
    }

    fn may_have_run(&self, i: usize) -> bool {
        self.succeeded[i] || self.timed_out[i] || self.aborted_in_flight[i]
    }

    fn compensations_issued(&self) -> impl Iterator<Item = &Issued> {
        self.issued.iter().filter(|c| c.cmd.kind == Kind::Compensation)
    }

    fn count_issued(&self, i: usize, kind: Kind) -> u32 {
        self.issued
            .iter()
            .filter(|c| c.index == i && c.cmd.kind == kind)
            .count() as u32
    }

    /// Checks commands just issued against what happened so far, and
    /// remembers them.
    fn record(&mut self, commands: Vec<CommandSpec>) -> Result<(), TestCaseError> {
        prop_assert!(commands.len() <= 1, "more than one command at once: {:?}", commands);
        for cmd in commands {
            let i = self.step_index(&cmd)?;
            let step = &self.def.steps()[i];
            // (c) no command twice
            for earlier in &self.issued {
                prop_assert!(
                    (&earlier.cmd.step, earlier.cmd.attempt, earlier.cmd.kind) != (&cmd.step, cmd.attempt, cmd.kind),
                    "issued twice: {:?}",
                    cmd
                );
            }
            let deadline = match cmd.kind {
                Kind::Action => {
                    prop_assert_eq!(&cmd.participant, &step.participant);
                    prop_assert_eq!(&cmd.message_type, &step.action);
                    prop_assert_eq!(cmd.attempt, self.count_issued(i, Kind::Action) + 1);
                    prop_assert!(cmd.attempt <= step.retry.max_attempts, "too many attempts: {:?}", cmd);
                    prop_assert!(self.succeeded[..i].iter().all(|&s| s), "{:?} sent out of order", cmd);
                    prop_assert!(!self.succeeded[i], "{:?}: the step already succeeded", cmd);
                    prop_assert!(
                        self.compensations_issued().next().is_none(),
                        "{:?} after compensating",
                        cmd
                    );
                    prop_assert_eq!(self.state.status, SagaStatus::Running);
                    self.now + step.timeout
                }
                Kind::Compensation => {
                    // (b) only for a step with a compensation, whose action may have run
                    let expected = step.compensation.as_ref();
                    prop_assert_eq!(
                        Some((&cmd.participant, &cmd.message_type)),
                        expected.map(|(p, m)| (p, m)),
                        "compensation of a step that has none"
                    );
                    prop_assert!(self.may_have_run(i), "{:?}: the action never ran", cmd);
                    prop_assert!(!self.compensated[i], "{:?}: already compensated", cmd);
                    // (b) newest first
                    if let Some(last) = self.compensations_issued().last() {
                        prop_assert!(
                            i <= last.index,
                            "{:?} issued after a compensation of step {}",
                            cmd,
                            last.index
                        );
                        if i != last.index {
                            prop_assert!(self.compensated[last.index], "{:?}: step {} not done", cmd, last.index);
                            self.compensation_failures = 0;
                        }
                    }
                    for j in i + 1..self.succeeded.len() {
                        let needs = self.may_have_run(j) && self.def.steps()[j].compensation.is_some();
                        prop_assert!(
                            !needs || self.compensated[j],
                            "{:?} before compensating step {}",
                            cmd,
                            j
                        );
                    }
                    prop_assert_eq!(cmd.attempt, self.count_issued(i, Kind::Compensation) + 1);
                    prop_assert_eq!(self.state.status, SagaStatus::Compensating);
                    self.now + self.def.compensation_timeout()
                }
            };
            prop_assert_eq!(self.state.cursor, i);
            prop_assert_eq!(
                self.state.wake_at,
                Some(deadline),
                "wake_at is not the deadline of {:?}",
                cmd
            );
            self.issued.push(Issued {
                cmd,
                index: i,
                deadline,
            });
            self.in_flight = Some(self.issued.len() - 1);
        }
        Ok(())
    }

    fn check_state(&self) -> Result<(), TestCaseError> {
        let s = &self.state;
        if s.status.is_final() {
            prop_assert_eq!(s.wake_at, None, "final saga with a wake_at");
            prop_assert!(s.finished_at.is_some(), "final saga without finished_at");
        } else {
            prop_assert!(s.wake_at.is_some(), "active saga without wake_at");
            prop_assert_eq!(s.finished_at, None);
        }
        // The coordinator stores the state as JSON between events.
        let json = serde_json::to_string(s).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let back: SagaState = serde_json::from_str(&json).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&back, s, "JSON round trip");
        Ok(())
    }

    /// What must follow an action that failed (transiently, by timeout or for good).
    fn after_action_failure(
        &self,
        cmd: &CommandSpec,
        gives_up: bool,
        sent: &[CommandSpec],
    ) -> Result<(), TestCaseError> {
        if gives_up || cmd.attempt >= self.def.steps()[self.step_index(cmd)?].retry.max_attempts {
            prop_assert!(
                matches!(self.state.status, SagaStatus::Compensating | SagaStatus::Compensated),
                "{:?} failed for good but the saga is {:?}",
                cmd,
                self.state.status
            );
        } else {
            prop_assert_eq!(self.state.status, SagaStatus::Running, "{:?} should be retried", cmd);
            prop_assert!(
                sent.is_empty(),
                "retry of {:?} sent before the backoff: {:?}",
                cmd,
                sent
            );
            // Every attempt so far failed: `attempt` failures in a row.
            let policy = &self.def.steps()[self.step_index(cmd)?].retry;
            let backoff = policy.backoff(cmd.attempt, self.jitter);
            prop_assert_eq!(self.state.wake_at, Some(self.now + backoff), "backoff after {:?}", cmd);
        }
        Ok(())
    }

    /// What must follow a compensation that failed (reply or timeout).
    fn after_compensation_failure(&mut self, cmd: &CommandSpec, sent: &[CommandSpec]) -> Result<(), TestCaseError> {
        self.compensation_failures += 1;
        prop_assert!(sent.is_empty(), "{:?} failed but {:?} was sent at once", cmd, sent);
        let policy = self.def.compensation_retry();
        if self.compensation_failures >= policy.max_attempts {
            prop_assert_eq!(
                self.state.status,
                SagaStatus::Stuck,
                "after {} compensation failures",
                self.compensation_failures
            );
        } else {
            prop_assert_eq!(
                self.state.status,
                SagaStatus::Compensating,
                "after {} compensation failures",
                self.compensation_failures
            );
            let backoff = policy.backoff(self.compensation_failures, self.jitter);
            prop_assert_eq!(self.state.wake_at, Some(self.now + backoff), "backoff after {:?}", cmd);
        }
        Ok(())
    }

    /// What a participant can say to `cmd` (compensations made to fail fail).
    fn can_say(&self, cmd: &CommandSpec, said: Said) -> Said {
        match (cmd.kind, said) {
            (Kind::Compensation, Said::Success) if self.compensations_fail => Said::TransientFailure,
            _ => said,
        }
    }

    /// The participant answers the command in flight.
    fn answer(&mut self, said: Said) -> Result<(), TestCaseError> {
        let Some(k) = self.in_flight else {
            return Ok(());
        };
        self.settle(k, said)
    }

    /// The reply to `issued[k]` that the engine must act on: the one in
    /// flight, or a definitive one from an earlier attempt of the same step.
    fn settle(&mut self, k: usize, said: Said) -> Result<(), TestCaseError> {
        let cmd = self.issued[k].cmd.clone();
        let i = self.issued[k].index;
        let said = self.can_say(&cmd, said);
        let event = reply_to(&cmd, said);
        let sent = self.apply_changed(event.clone())?;
        self.in_flight = None;
        self.replies.push(event);
        match (cmd.kind, said) {
            (Kind::Action, Said::Success) => {
                self.succeeded[i] = true;
                if i + 1 == self.succeeded.len() {
                    prop_assert_eq!(self.state.status, SagaStatus::Completed);
                    prop_assert!(sent.is_empty(), "completed but sent {:?}", sent);
                } else {
                    prop_assert_eq!(sent.len(), 1, "no next action after {:?}", cmd);
                }
            }
            (Kind::Action, Said::BusinessFailure) => {
                self.business_failed[i] = true;
                self.after_action_failure(&cmd, true, &sent)?;
            }
            (Kind::Action, Said::TransientFailure) => self.after_action_failure(&cmd, false, &sent)?,
            (Kind::Compensation, Said::Success) => {
                self.compensated[i] = true;
                self.compensation_failures = 0;
            }
            (Kind::Compensation, _) => self.after_compensation_failure(&cmd, &sent)?,
        }
        self.record(sent)?;
        self.check_state()
    }

    /// A tick `late_ms` after `wake_at`.
    fn tick(&mut self, late_ms: u64) -> Result<(), TestCaseError> {
        self.tick_with(late_ms, Event::Tick)
    }

    /// `QueueBacklog` `late_ms` after `wake_at`: the attempt in flight gets
    /// one more timeout, capped at `MAX_QUEUE_WAIT` after the phase's first
    /// attempt, and nothing else changes; past the cap, or during a
    /// backoff, it must do exactly what a tick does.
    fn backlog(&mut self, late_ms: u64) -> Result<(), TestCaseError> {
        let event = Event::QueueBacklog {
            max_wait: MAX_QUEUE_WAIT,
        };
        let (Some(at), Some(k)) = (self.state.wake_at, self.in_flight) else {
            return self.tick_with(late_ms, event);
        };
        let now = self.now.max(at) + Duration::from_millis(late_ms);
        let (index, kind) = (self.issued[k].index, self.issued[k].cmd.kind);
        let (timeout, first_sent) = {
            let step = &self.state.steps[index];
            match kind {
                Kind::Action => (self.def.steps()[index].timeout, step.attempts[0].sent_at),
                Kind::Compensation => (self.def.compensation_timeout(), step.compensations[0].sent_at),
            }
        };
        let deadline = (now + timeout).min(first_sent + MAX_QUEUE_WAIT);
        if deadline <= now {
            return self.tick_with(late_ms, event);
        }
        self.now = now;
        let mut expected = self.state.clone();
        let sent = self.apply_changed(event)?;
        prop_assert!(sent.is_empty(), "a backlog sent {:?}", sent);
        expected.wake_at = Some(deadline);
        let records = match kind {
            Kind::Action => &mut expected.steps[index].attempts,
            Kind::Compensation => &mut expected.steps[index].compensations,
        };
        if let Some(last) = records.last_mut() {
            last.deadline = deadline;
        }
        prop_assert_eq!(&self.state, &expected, "a backlog changes only the deadline");
        self.issued[k].deadline = deadline;
        self.check_state()
    }

    fn tick_with(&mut self, late_ms: u64, event: Event) -> Result<(), TestCaseError> {
        let late = Duration::from_millis(late_ms);
        let Some(at) = self.state.wake_at else {
            self.now += late;
            return self.expect_ignored(event);
        };
        self.now = self.now.max(at) + late;
        let sent = self.apply_changed(event)?;
        match self.in_flight.take() {
            Some(k) => {
                let cmd = self.issued[k].cmd.clone();
                prop_assert!(self.now >= self.issued[k].deadline, "{:?} timed out early", cmd);
                match cmd.kind {
                    Kind::Action => {
                        self.timed_out[self.issued[k].index] = true;
                        self.after_action_failure(&cmd, false, &sent)?;
                    }
                    Kind::Compensation => self.after_compensation_failure(&cmd, &sent)?,
                }
            }
            None => {
                // A backoff ended: the next attempt of the current step.
                prop_assert_eq!(sent.len(), 1, "backoff ended but nothing was sent");
                let expected = match self.state.status {
                    SagaStatus::Running => Kind::Action,
                    _ => Kind::Compensation,
                };
                prop_assert_eq!(sent[0].kind, expected);
                prop_assert!(sent[0].attempt > 1, "a backoff precedes only a retry: {:?}", sent[0]);
            }
        }
        self.record(sent)?;
        self.check_state()
    }

    fn early_tick(&mut self) -> Result<(), TestCaseError> {
        match self.state.wake_at {
            Some(at) if self.now < at => self.expect_ignored(Event::Tick),
            _ => Ok(()),
        }
    }

    fn duplicate(&self, pick: &Index) -> Result<(), TestCaseError> {
        if self.replies.is_empty() {
            return Ok(());
        }
        self.expect_ignored(self.replies[pick.index(self.replies.len())].clone())
    }

    fn stale(&mut self, pick: &Index, said: Said) -> Result<(), TestCaseError> {
        let stale: Vec<usize> = (0..self.issued.len()).filter(|&k| Some(k) != self.in_flight).collect();
        if stale.is_empty() {
            return Ok(());
        }
        let k = stale[pick.index(stale.len())];
        let cmd = self.issued[k].cmd.clone();
        let said = self.can_say(&cmd, said);
        if self.settles(&cmd, said) {
            return self.settle(k, said);
        }
        self.expect_ignored(reply_to(&cmd, said))
    }

    /// Whether a reply to an earlier attempt settles the step: it is
    /// definitive (the barrier gives every attempt of a step the same
    /// definitive answer) and for the phase the current step is in.
    fn settles(&self, cmd: &CommandSpec, said: Said) -> bool {
        let Some(i) = self.def.step_index(&cmd.step) else {
            return false;
        };
        if self.state.cursor != i {
            return false;
        }
        match cmd.kind {
            Kind::Action => self.state.status == SagaStatus::Running && !matches!(said, Said::TransientFailure),
            Kind::Compensation => self.state.status == SagaStatus::Compensating && matches!(said, Said::Success),
        }
    }

    fn unknown_attempt(&self, pick: &Index, compensation: bool, past: u32) -> Result<(), TestCaseError> {
        let i = pick.index(self.succeeded.len());
        let kind = if compensation { Kind::Compensation } else { Kind::Action };
        let attempt = if past == 0 {
            0
        } else {
            self.count_issued(i, kind) + past
        };
        self.expect_ignored(Event::Reply {
            step: self.def.steps()[i].name.clone(),
            attempt,
            kind,
            outcome: Said::Success.outcome(),
        })
    }

    fn unknown_step(&self) -> Result<(), TestCaseError> {
        let got = self.apply(Event::Reply {
            step: "nope".into(),
            attempt: 1,
            kind: Kind::Action,
            outcome: Said::Success.outcome(),
        });
        prop_assert_eq!(
            got,
            Err(EngineError::UnknownStep {
                saga_type: "random".into(),
                step: "nope".into(),
            })
        );
        Ok(())
    }

    fn retry(&mut self) -> Result<(), TestCaseError> {
        if self.state.status != SagaStatus::Stuck {
            let got = self.apply(Event::Retry);
            prop_assert!(
                matches!(got, Err(EngineError::InvalidOperatorAction { action: "retry", .. })),
                "retry of a {:?} saga: {:?}",
                self.state.status,
                got
            );
            return Ok(());
        }
        let stuck_on = self.state.cursor;
        let sent = self.apply_changed(Event::Retry)?;
        prop_assert_eq!(sent.len(), 1, "retry sent nothing");
        prop_assert_eq!(sent[0].kind, Kind::Compensation);
        prop_assert_eq!(&sent[0].step, &self.def.steps()[stuck_on].name);
        self.compensation_failures = 0;
        self.record(sent)?;
        self.check_state()
    }

    fn abort(&mut self) -> Result<(), TestCaseError> {
        if self.state.status != SagaStatus::Running {
            let got = self.apply(Event::Abort { reason: "op".into() });
            prop_assert!(
                matches!(got, Err(EngineError::InvalidOperatorAction { action: "abort", .. })),
                "abort of a {:?} saga: {:?}",
                self.state.status,
                got
            );
            return Ok(());
        }
        let sent = self.apply_changed(Event::Abort { reason: "op".into() })?;
        self.aborted = true;
        if let Some(k) = self.in_flight.take() {
            self.aborted_in_flight[self.issued[k].index] = true;
        }
        prop_assert!(
            matches!(self.state.status, SagaStatus::Compensating | SagaStatus::Compensated),
            "aborted but {:?}",
            self.state.status
        );
        self.record(sent)?;
        self.check_state()
    }

    fn play(&mut self, choice: &Choice) -> Result<(), TestCaseError> {
        match choice {
            Choice::Answer(said) => match self.in_flight {
                Some(_) => self.answer(*said),
                None => self.tick(0),
            },
            Choice::Tick { late_ms } => self.tick(*late_ms),
            Choice::EarlyTick => self.early_tick(),
            Choice::Backlog { late_ms } => self.backlog(*late_ms),
            Choice::Duplicate(pick) => self.duplicate(pick),
            Choice::Stale(pick, said) => self.stale(pick, *said),
            Choice::UnknownAttempt(pick, compensation, past) => self.unknown_attempt(pick, *compensation, *past),
            Choice::UnknownStep => self.unknown_step(),
            Choice::Retry => self.retry(),
        }
    }

    /// Successes (or, for compensations made to fail, failures), ticks, and
    /// retries of a saga stuck by chance, until the saga is final.
    fn force(&mut self) -> Result<(), TestCaseError> {
        for _ in 0..FORCE_BOUND {
            match self.state.status {
                SagaStatus::Stuck if !self.compensations_fail => self.retry()?,
                s if s.is_final() => return Ok(()),
                _ if self.in_flight.is_some() => self.answer(Said::Success)?,
                _ => self.tick(0)?,
            }
        }
        Err(TestCaseError::fail(format!(
            "not final after {FORCE_BOUND} forced events: {:?}",
            self.state.status
        )))
    }

    /// (f) a final saga ignores replies and ticks; operators get errors
    /// except for the retry of a stuck saga.
    fn check_quiet(&mut self) -> Result<(), TestCaseError> {
        self.now += Duration::from_secs(3600);
        self.expect_ignored(Event::Tick)?;
        for r in &self.replies {
            self.expect_ignored(r.clone())?;
        }
        for c in &self.issued {
            for said in [Said::Success, Said::BusinessFailure, Said::TransientFailure] {
                self.expect_ignored(reply_to(&c.cmd, said))?;
            }
        }
        let abort = self.apply(Event::Abort { reason: "late".into() });
        prop_assert!(
            matches!(abort, Err(EngineError::InvalidOperatorAction { .. })),
            "abort of a final saga: {:?}",
            abort
        );
        if self.state.status != SagaStatus::Stuck {
            let retry = self.apply(Event::Retry);
            prop_assert!(
                matches!(retry, Err(EngineError::InvalidOperatorAction { .. })),
                "retry of a final saga: {:?}",
                retry
            );
        }
        Ok(())
    }

    /// Where the saga ended, against what happened.
    fn check_end(&self) -> Result<(), TestCaseError> {
        let n = self.succeeded.len();
        let compensations: Vec<usize> = self.compensations_issued().map(|c| c.index).collect();
        match self.state.status {
            // (d) every step succeeded, nothing was compensated
            SagaStatus::Completed => {
                prop_assert!(self.succeeded.iter().all(|&s| s));
                prop_assert!(
                    compensations.is_empty(),
                    "completed after compensating {:?}",
                    compensations
                );
                prop_assert!(self.state.steps.iter().all(|s| s.status == StepStatus::Succeeded));
            }
            SagaStatus::Compensated => {
                prop_assert!(
                    !self.succeeded.iter().all(|&s| s),
                    "compensated although every step succeeded"
                );
                for i in 0..n {
                    let needs = self.may_have_run(i) && self.def.steps()[i].compensation.is_some();
                    prop_assert_eq!(
                        needs,
                        self.compensated[i],
                        "step {} compensated: {}",
                        i,
                        self.compensated[i]
                    );
                }
                // The step that failed used all its attempts, unless it failed
                // for good or was aborted.
                let failed = (0..n)
                    .rev()
                    .find(|&i| self.count_issued(i, Kind::Action) > 0)
                    .unwrap_or(0);
                if !self.business_failed[failed] && !self.aborted {
                    prop_assert_eq!(
                        self.count_issued(failed, Kind::Action),
                        self.def.steps()[failed].retry.max_attempts
                    );
                }
            }
            SagaStatus::Stuck => {
                prop_assert!(self.compensations_fail, "stuck although compensations succeed");
            }
            s => return Err(TestCaseError::fail(format!("not final: {s:?}"))),
        }
        // (e) a step that only failed for business reasons is never compensated
        for i in 0..n {
            if self.business_failed[i] && !self.may_have_run(i) {
                prop_assert!(
                    !compensations.contains(&i),
                    "step {} compensated after a business failure",
                    i
                );
            }
        }
        // (b) newest first, over the whole run
        prop_assert!(
            compensations.windows(2).all(|w| w[0] >= w[1]),
            "compensation order {:?}",
            compensations
        );
        Ok(())
    }
}

fn run(case: &Case) -> Result<(), TestCaseError> {
    let mut sim = Sim::start(case)?;
    for (n, (choice, delay_ms)) in case.events.iter().enumerate() {
        if case.abort_at == Some(n) {
            sim.abort()?;
        }
        sim.now += Duration::from_millis(*delay_ms);
        sim.play(choice)?;
    }
    sim.force()?;
    // (a) final: COMPLETED or COMPENSATED, or STUCK when compensations fail
    sim.check_end()?;
    sim.check_quiet()?;
    if sim.state.status == SagaStatus::Stuck {
        // An operator fixes the participant and retries: the saga finishes.
        sim.compensations_fail = false;
        sim.force()?;
        prop_assert_eq!(sim.state.status, SagaStatus::Compensated);
        sim.check_end()?;
        sim.check_quiet()?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_sagas_end_well(case in case()) {
        run(&case)?;
    }
}
