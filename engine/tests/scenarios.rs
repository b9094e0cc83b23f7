//! Given/expect tests of the engine on the order saga (in the style of
//! Eventuate Tram's saga unit tests): start a saga, feed it replies, ticks
//! and operator actions, and check exactly which commands it sends and
//! where it ends.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use skald_engine::{
    Applied, AttemptOutcome, CommandSpec, Ctx, EngineError, Event, Kind, Outcome, ParticipantName, RetryPolicy,
    SagaDefinition, SagaState, SagaStatus, StepStatus, apply, start,
};

const STEP_TIMEOUT: Duration = Duration::from_secs(5);
const COMPENSATION_TIMEOUT: Duration = Duration::from_secs(4);
/// With a jitter of 0.5, `backoff` keeps 3/4 of the exponential delay.
const JITTER: f64 = 0.5;

/// The order saga: four steps, the last one cannot be undone.
#[rustfmt::skip]
fn order_saga() -> SagaDefinition {
    SagaDefinition::builder("order")
        .default_timeout(STEP_TIMEOUT)
        .default_retry(RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(10),
            multiplier: 2.0,
        })
        .compensation_retry(
            RetryPolicy {
                max_attempts: 3,
                initial_backoff: Duration::from_secs(2),
                max_backoff: Duration::from_secs(20),
                multiplier: 2.0,
            },
            COMPENSATION_TIMEOUT,
        )
        .step("create_order")
            .invoke("order", "CreateOrder")
            .compensate("order", "CancelOrder")
        .step("charge_payment")
            .invoke("payment", "ChargePayment")
            .compensate("payment", "RefundPayment")
        .step("reserve_stock")
            .invoke("inventory", "ReserveStock")
            .compensate("inventory", "ReleaseStock")
        .step("approve_order")
            .invoke("order", "ApproveOrder")
        .build()
        .expect("the order saga is a valid definition")
}

fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_767_225_600, 0).expect("valid timestamp")
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn command(kind: Kind, step: &str, attempt: u32, participant: &str, message_type: &str) -> CommandSpec {
    CommandSpec {
        step: step.to_owned(),
        attempt,
        kind,
        participant: ParticipantName::parse(participant).expect("valid participant"),
        message_type: message_type.to_owned(),
    }
}

fn create_order(attempt: u32) -> CommandSpec {
    command(Kind::Action, "create_order", attempt, "order", "CreateOrder")
}
fn charge_payment(attempt: u32) -> CommandSpec {
    command(Kind::Action, "charge_payment", attempt, "payment", "ChargePayment")
}
fn reserve_stock(attempt: u32) -> CommandSpec {
    command(Kind::Action, "reserve_stock", attempt, "inventory", "ReserveStock")
}
fn approve_order(attempt: u32) -> CommandSpec {
    command(Kind::Action, "approve_order", attempt, "order", "ApproveOrder")
}
fn cancel_order(attempt: u32) -> CommandSpec {
    command(Kind::Compensation, "create_order", attempt, "order", "CancelOrder")
}
fn refund_payment(attempt: u32) -> CommandSpec {
    command(
        Kind::Compensation,
        "charge_payment",
        attempt,
        "payment",
        "RefundPayment",
    )
}

fn reply(step: &str, attempt: u32, kind: Kind, outcome: Outcome) -> Event {
    Event::Reply {
        step: step.to_owned(),
        attempt,
        kind,
        outcome,
    }
}

fn success() -> Outcome {
    Outcome::Success { data: json!({}) }
}

fn failure(retryable: bool, reason: &str) -> Outcome {
    Outcome::Failure {
        retryable,
        reason: reason.to_owned(),
    }
}

/// One saga under test: the state so far, the clock, and what the last
/// event did.
struct SagaTest {
    def: SagaDefinition,
    now: DateTime<Utc>,
    state: SagaState,
    /// The state before the last event.
    before: SagaState,
    sent: Vec<CommandSpec>,
    applied: Applied,
}

impl SagaTest {
    /// A new order saga, started at `t0()`.
    fn given() -> Self {
        let def = order_saga();
        let now = t0();
        let t = start(&def, Ctx { now, jitter: JITTER });
        Self {
            def,
            now,
            before: t.state.clone(),
            state: t.state,
            sent: t.commands,
            applied: t.applied,
        }
    }

    fn try_when(&mut self, event: Event) -> Result<&mut Self, EngineError> {
        let ctx = Ctx {
            now: self.now,
            jitter: JITTER,
        };
        let t = apply(&self.def, self.state.clone(), event, ctx)?;
        self.before = std::mem::replace(&mut self.state, t.state);
        self.sent = t.commands;
        self.applied = t.applied;
        Ok(self)
    }

    fn when(&mut self, event: Event) -> &mut Self {
        let shown = format!("{event:?}");
        self.try_when(event)
            .unwrap_or_else(|e| panic!("{shown} was refused: {e}"))
    }

    /// The engine must refuse `event`; the saga is left as it was.
    fn rejects(&mut self, event: Event) -> EngineError {
        let state = self.state.clone();
        let Err(e) = self.try_when(event.clone()) else {
            panic!("{event:?} was accepted in status {:?}", state.status);
        };
        assert_eq!(self.state, state);
        e
    }

    fn succeeds(&mut self, step: &str, attempt: u32) -> &mut Self {
        self.when(reply(step, attempt, Kind::Action, success()))
    }
    fn fails(&mut self, step: &str, attempt: u32) -> &mut Self {
        self.when(reply(step, attempt, Kind::Action, failure(false, "declined")))
    }
    fn fails_transiently(&mut self, step: &str, attempt: u32) -> &mut Self {
        self.when(reply(step, attempt, Kind::Action, failure(true, "unavailable")))
    }
    fn compensated(&mut self, step: &str, attempt: u32) -> &mut Self {
        self.when(reply(step, attempt, Kind::Compensation, success()))
    }
    fn compensation_fails(&mut self, step: &str, attempt: u32) -> &mut Self {
        self.when(reply(step, attempt, Kind::Compensation, failure(true, "db down")))
    }

    /// Moves the clock forward.
    fn wait(&mut self, d: Duration) -> &mut Self {
        self.now += d;
        self
    }
    fn tick(&mut self) -> &mut Self {
        self.when(Event::Tick)
    }
    /// Moves the clock to the saga's `wake_at` and ticks.
    fn tick_at_wake_at(&mut self) -> &mut Self {
        self.now = self.state.wake_at.expect("the saga is waiting for a tick");
        self.tick()
    }

    fn expect(&mut self, commands: &[CommandSpec]) -> &mut Self {
        assert_eq!(self.applied, Applied::Changed);
        assert_eq!(self.sent, commands);
        self
    }
    /// The last event changed nothing at all.
    fn expect_ignored(&mut self) -> &mut Self {
        assert!(
            matches!(self.applied, Applied::Ignored(_)),
            "expected the event to be ignored, got {:?}",
            self.applied
        );
        assert_eq!(self.sent, []);
        assert_eq!(self.state, self.before);
        self
    }
    fn expect_status(&mut self, status: SagaStatus) -> &mut Self {
        assert_eq!(self.state.status, status);
        if status.is_final() {
            assert_eq!(self.state.wake_at, None, "a final saga wants no tick");
            assert_eq!(self.state.finished_at, Some(self.now));
        } else {
            assert!(self.state.wake_at.is_some(), "an active saga wants a tick");
            assert_eq!(self.state.finished_at, None);
        }
        self
    }
    fn expect_wake_at(&mut self, at: DateTime<Utc>) -> &mut Self {
        assert_eq!(self.state.wake_at, Some(at));
        self
    }
    fn step_status(&self, step: &str) -> StepStatus {
        let i = self.def.step_index(step).expect("known step");
        self.state.steps[i].status
    }
    fn expect_steps(&mut self, statuses: [StepStatus; 4]) -> &mut Self {
        let actual: Vec<StepStatus> = self.state.steps.iter().map(|s| s.status).collect();
        assert_eq!(actual, statuses);
        self
    }
    fn action_outcomes(&self, step: &str) -> Vec<Option<AttemptOutcome>> {
        let i = self.def.step_index(step).expect("known step");
        self.state.steps[i].attempts.iter().map(|a| a.outcome.clone()).collect()
    }
}

/// create_order and charge_payment succeeded; reserve_stock attempt 1 is in flight.
fn two_steps_done() -> SagaTest {
    let mut saga = SagaTest::given();
    saga.succeeds("create_order", 1)
        .succeeds("charge_payment", 1)
        .expect(&[reserve_stock(1)]);
    saga
}

#[test]
fn happy_path_runs_the_four_actions_in_order_and_completes() {
    let mut saga = SagaTest::given();
    saga.expect(&[create_order(1)])
        .expect_status(SagaStatus::Running)
        .expect_wake_at(t0() + STEP_TIMEOUT);
    saga.wait(secs(1.0))
        .when(reply(
            "create_order",
            1,
            Kind::Action,
            Outcome::Success {
                data: json!({"order_id": 42}),
            },
        ))
        .expect(&[charge_payment(1)])
        .expect_wake_at(t0() + secs(1.0) + STEP_TIMEOUT);
    saga.wait(secs(1.0))
        .succeeds("charge_payment", 1)
        .expect(&[reserve_stock(1)]);
    saga.wait(secs(1.0))
        .succeeds("reserve_stock", 1)
        .expect(&[approve_order(1)]);
    saga.wait(secs(1.0))
        .succeeds("approve_order", 1)
        .expect(&[])
        .expect_status(SagaStatus::Completed)
        .expect_steps([StepStatus::Succeeded; 4]);

    assert_eq!(saga.state.finished_at, Some(t0() + secs(4.0)));
    assert_eq!(saga.state.failure, None);
    assert_eq!(saga.state.steps[0].data, json!({"order_id": 42}));
    assert!(saga.state.steps.iter().all(|s| s.compensations.is_empty()));
    assert_eq!(saga.action_outcomes("approve_order"), [Some(AttemptOutcome::Succeeded)]);

    // Nothing is due any more.
    saga.wait(secs(3600.0)).tick().expect_ignored();
}

#[test]
fn business_failure_at_step_2_compensates_step_1_only() {
    let mut saga = SagaTest::given();
    saga.succeeds("create_order", 1)
        .fails("charge_payment", 1)
        .expect(&[cancel_order(1)])
        .expect_status(SagaStatus::Compensating)
        .expect_wake_at(t0() + COMPENSATION_TIMEOUT)
        .expect_steps([
            StepStatus::Compensating,
            StepStatus::Failed,
            StepStatus::Pending,
            StepStatus::Pending,
        ]);
    let reason = saga.state.failure.clone().expect("the failure is recorded");
    assert!(
        reason.contains("charge_payment") && reason.contains("declined"),
        "{reason}"
    );

    saga.compensated("create_order", 1)
        .expect(&[])
        .expect_status(SagaStatus::Compensated)
        .expect_steps([
            StepStatus::Compensated,
            StepStatus::Failed,
            StepStatus::Pending,
            StepStatus::Pending,
        ]);
    assert!(!saga.state.steps[1].may_have_run);
    assert!(saga.state.steps[1].compensations.is_empty());
}

#[test]
fn business_failure_at_step_1_needs_no_compensation() {
    let mut saga = SagaTest::given();
    saga.fails("create_order", 1)
        .expect(&[])
        .expect_status(SagaStatus::Compensated);
}

#[test]
fn business_failure_at_step_3_compensates_newest_first() {
    let mut saga = two_steps_done();
    saga.fails("reserve_stock", 1)
        .expect(&[refund_payment(1)])
        .expect_status(SagaStatus::Compensating);
    saga.compensated("charge_payment", 1)
        .expect(&[cancel_order(1)])
        .expect_status(SagaStatus::Compensating);
    saga.compensated("create_order", 1)
        .expect(&[])
        .expect_status(SagaStatus::Compensated)
        .expect_steps([
            StepStatus::Compensated,
            StepStatus::Compensated,
            StepStatus::Failed,
            StepStatus::Pending,
        ]);
}

#[test]
fn business_failure_at_the_last_step_compensates_the_three_before_it() {
    let mut saga = two_steps_done();
    saga.succeeds("reserve_stock", 1)
        .fails("approve_order", 1)
        .expect(&[command(
            Kind::Compensation,
            "reserve_stock",
            1,
            "inventory",
            "ReleaseStock",
        )]);
    saga.compensated("reserve_stock", 1).expect(&[refund_payment(1)]);
    saga.compensated("charge_payment", 1).expect(&[cancel_order(1)]);
    saga.compensated("create_order", 1)
        .expect(&[])
        .expect_status(SagaStatus::Compensated);
}

#[test]
fn transient_failure_waits_for_a_tick_then_sends_the_next_attempt() {
    let mut saga = SagaTest::given();
    saga.succeeds("create_order", 1).wait(secs(1.0));
    let failed_at = saga.now;
    saga.fails_transiently("charge_payment", 1)
        .expect(&[])
        .expect_status(SagaStatus::Running)
        // first backoff: 1s, of which 3/4 with a jitter of 0.5
        .expect_wake_at(failed_at + secs(0.75));
    assert_eq!(saga.step_status("charge_payment"), StepStatus::RetryWait);

    // Early: nothing happens.
    saga.wait(secs(0.5)).tick().expect_ignored();

    saga.tick_at_wake_at()
        .expect(&[charge_payment(2)])
        .expect_wake_at(failed_at + secs(0.75) + STEP_TIMEOUT);
    assert_eq!(saga.step_status("charge_payment"), StepStatus::Running);

    // The second failure in a row backs off twice as long.
    let failed_again_at = saga.now;
    saga.fails_transiently("charge_payment", 2)
        .expect(&[])
        .expect_wake_at(failed_again_at + secs(1.5));
    saga.tick_at_wake_at().expect(&[charge_payment(3)]);

    saga.succeeds("charge_payment", 3).expect(&[reserve_stock(1)]);
    assert_eq!(
        saga.action_outcomes("charge_payment"),
        [
            Some(AttemptOutcome::Failed {
                retryable: true,
                reason: "unavailable".into()
            }),
            Some(AttemptOutcome::Failed {
                retryable: true,
                reason: "unavailable".into()
            }),
            Some(AttemptOutcome::Succeeded),
        ]
    );
    // A step that recovered from transient failures is not compensated later
    // for them: a business failure at step 3 still refunds the payment once.
    saga.fails("reserve_stock", 1).expect(&[refund_payment(1)]);
}

#[test]
fn transient_failures_until_attempts_run_out_compensate_the_steps_before() {
    let mut saga = SagaTest::given();
    saga.succeeds("create_order", 1).fails_transiently("charge_payment", 1);
    saga.tick_at_wake_at().fails_transiently("charge_payment", 2);
    saga.tick_at_wake_at()
        .expect(&[charge_payment(3)])
        .fails_transiently("charge_payment", 3)
        // the payment service said no three times: nothing was charged
        .expect(&[cancel_order(1)])
        .expect_status(SagaStatus::Compensating);
    let reason = saga.state.failure.clone().expect("the failure is recorded");
    assert!(reason.contains("after 3 attempts"), "{reason}");
    saga.compensated("create_order", 1)
        .expect(&[])
        .expect_status(SagaStatus::Compensated);
}

/// How long an attempt may wait behind a participant's backlog in these tests.
const MAX_QUEUE_WAIT: Duration = Duration::from_secs(12);

fn backlog() -> Event {
    Event::QueueBacklog {
        max_wait: MAX_QUEUE_WAIT,
    }
}

#[test]
fn an_attempt_queued_behind_a_backlog_gets_another_timeout_instead_of_a_retry() {
    let mut saga = SagaTest::given();
    let order = ParticipantName::parse("order").expect("valid participant");
    assert_eq!(saga.state.waiting_on(&saga.def), Some(&order));
    // Not due yet: a backlog changes nothing either.
    saga.wait(STEP_TIMEOUT - Duration::from_millis(1))
        .when(backlog())
        .expect_ignored();
    // Due while the order participant's queue is backlogged: no retry, the
    // same attempt gets one more timeout, and its record shows the deadline.
    saga.wait(Duration::from_millis(1))
        .when(backlog())
        .expect(&[])
        .expect_status(SagaStatus::Running)
        .expect_wake_at(t0() + STEP_TIMEOUT * 2);
    assert_eq!(saga.action_outcomes("create_order"), [None]);
    assert_eq!(saga.state.steps[0].attempts[0].deadline, t0() + STEP_TIMEOUT * 2);
    // The command's turn comes: its reply is the first attempt's.
    saga.succeeds("create_order", 1).expect(&[charge_payment(1)]);
}

#[test]
fn a_backlog_wait_ends_at_max_wait_and_the_attempt_then_times_out() {
    let mut saga = SagaTest::given();
    // 5 s timeout, 12 s at most: due at 5, then at 10, then at 12 (capped).
    saga.now = t0() + STEP_TIMEOUT;
    saga.when(backlog()).expect_wake_at(t0() + STEP_TIMEOUT * 2);
    saga.now = saga.state.wake_at.expect("waiting");
    saga.when(backlog()).expect(&[]).expect_wake_at(t0() + MAX_QUEUE_WAIT);
    saga.now = t0() + MAX_QUEUE_WAIT;
    saga.when(backlog())
        .expect(&[])
        .expect_wake_at(t0() + MAX_QUEUE_WAIT + secs(0.75));
    assert_eq!(saga.action_outcomes("create_order"), [Some(AttemptOutcome::TimedOut)]);
    assert_eq!(saga.step_status("create_order"), StepStatus::RetryWait);
    // Backing off, nothing is in flight: a backlog is a tick, and the retry goes.
    assert_eq!(saga.state.waiting_on(&saga.def), None);
    saga.now = saga.state.wake_at.expect("backing off");
    saga.when(backlog()).expect(&[create_order(2)]);
    // The wait is over for this step: the retry's deadline is not moved.
    saga.now += STEP_TIMEOUT;
    saga.when(backlog()).expect(&[]);
    assert_eq!(saga.step_status("create_order"), StepStatus::RetryWait);
}

#[test]
fn a_compensation_queued_behind_a_backlog_gets_another_compensation_timeout() {
    let mut saga = SagaTest::given();
    saga.succeeds("create_order", 1)
        .fails("charge_payment", 1)
        .expect(&[cancel_order(1)]);
    let sent_at = saga.now;
    let order = ParticipantName::parse("order").expect("valid participant");
    assert_eq!(saga.state.waiting_on(&saga.def), Some(&order));
    saga.now = sent_at + COMPENSATION_TIMEOUT;
    saga.when(backlog())
        .expect(&[])
        .expect_status(SagaStatus::Compensating)
        .expect_wake_at(sent_at + COMPENSATION_TIMEOUT * 2);
    saga.compensated("create_order", 1)
        .expect(&[])
        .expect_status(SagaStatus::Compensated);
    assert_eq!(saga.state.waiting_on(&saga.def), None);
}

#[test]
fn tick_before_wake_at_is_ignored() {
    let mut saga = SagaTest::given();
    // The attempt in flight has not reached its deadline yet.
    saga.wait(STEP_TIMEOUT - Duration::from_millis(1))
        .tick()
        .expect_ignored();
    // At the deadline it times out.
    saga.wait(Duration::from_millis(1))
        .tick()
        .expect(&[])
        .expect_status(SagaStatus::Running);
    assert_eq!(saga.action_outcomes("create_order"), [Some(AttemptOutcome::TimedOut)]);
    // A backoff that has not ended yet.
    let wake_at = saga.state.wake_at.expect("backing off");
    saga.now = wake_at - Duration::from_millis(1);
    saga.tick().expect_ignored();
    saga.tick_at_wake_at().expect(&[create_order(2)]);
}

#[test]
fn timeout_of_the_last_attempt_of_step_2_compensates_step_2_too() {
    let mut saga = SagaTest::given();
    saga.succeeds("create_order", 1);
    for attempt in 1..=3 {
        assert_eq!(saga.sent, [charge_payment(attempt)]);
        saga.tick_at_wake_at();
        if attempt < 3 {
            saga.expect(&[]).expect_status(SagaStatus::Running);
            saga.tick_at_wake_at();
        }
    }
    // The payment may have been taken by any of the three attempts.
    saga.expect(&[refund_payment(1)])
        .expect_status(SagaStatus::Compensating)
        .expect_steps([
            StepStatus::Succeeded,
            StepStatus::Compensating,
            StepStatus::Pending,
            StepStatus::Pending,
        ]);
    assert_eq!(
        saga.action_outcomes("charge_payment"),
        [const { Some(AttemptOutcome::TimedOut) }; 3]
    );
    assert!(saga.state.steps[1].may_have_run);
    saga.compensated("charge_payment", 1).expect(&[cancel_order(1)]);
    saga.compensated("create_order", 1)
        .expect(&[])
        .expect_status(SagaStatus::Compensated)
        .expect_steps([
            StepStatus::Compensated,
            StepStatus::Compensated,
            StepStatus::Pending,
            StepStatus::Pending,
        ]);
}

#[test]
fn an_earlier_timeout_makes_a_later_business_failure_compensate_the_step() {
    let mut saga = SagaTest::given();
    saga.succeeds("create_order", 1);
    saga.tick_at_wake_at().expect(&[]); // attempt 1 timed out: it may have charged
    saga.tick_at_wake_at().expect(&[charge_payment(2)]);
    saga.fails("charge_payment", 2)
        .expect(&[refund_payment(1)])
        .expect_status(SagaStatus::Compensating);
    saga.compensated("charge_payment", 1).expect(&[cancel_order(1)]);
}

#[test]
fn stale_reply_that_settles_nothing_is_ignored() {
    let mut saga = SagaTest::given();
    saga.succeeds("create_order", 1);
    saga.tick_at_wake_at().expect(&[]);
    // Attempt 1 timed out and fails transiently during the backoff: no news.
    saga.fails_transiently("charge_payment", 1).expect_ignored();
    saga.tick_at_wake_at().expect(&[charge_payment(2)]);

    // ... or after attempt 2 was sent.
    saga.fails_transiently("charge_payment", 1).expect_ignored();
    // A reply for an attempt that was never sent.
    saga.succeeds("charge_payment", 3).expect_ignored();
    saga.succeeds("charge_payment", 0).expect_ignored();
    // A reply to the step already done, or to a step not started.
    saga.succeeds("create_order", 1).expect_ignored();
    saga.succeeds("reserve_stock", 1).expect_ignored();
    // A compensation reply while running.
    saga.compensated("create_order", 1).expect_ignored();

    saga.succeeds("charge_payment", 2).expect(&[reserve_stock(1)]);
    // Attempt 1 answers after the step is done: too late, whatever it says.
    saga.succeeds("charge_payment", 1).expect_ignored();
    saga.fails("charge_payment", 1).expect_ignored();
}

#[test]
fn an_earlier_attempts_success_settles_the_step_during_the_backoff() {
    let mut saga = SagaTest::given();
    saga.succeeds("create_order", 1);
    saga.tick_at_wake_at().expect(&[]); // attempt 1 timed out
    saga.succeeds("charge_payment", 1)
        .expect(&[reserve_stock(1)])
        .expect_status(SagaStatus::Running);
    assert_eq!(
        saga.action_outcomes("charge_payment"),
        vec![Some(AttemptOutcome::TimedOut)],
        "no retry was sent, and attempt 1's record still says how it ended"
    );
    // The backoff's tick is gone: the deadline is reserve_stock's.
    saga.tick().expect_ignored();
}

#[test]
fn an_earlier_attempts_success_settles_the_step_while_a_retry_is_in_flight() {
    let mut saga = SagaTest::given();
    saga.succeeds("create_order", 1);
    saga.tick_at_wake_at().expect(&[]);
    saga.tick_at_wake_at().expect(&[charge_payment(2)]);
    // The barrier gives attempt 2 the same answer: no need to wait for it.
    saga.succeeds("charge_payment", 1).expect(&[reserve_stock(1)]);
    assert_eq!(
        saga.action_outcomes("charge_payment"),
        vec![Some(AttemptOutcome::TimedOut), Some(AttemptOutcome::Succeeded)]
    );
    saga.succeeds("charge_payment", 2).expect_ignored();
}

#[test]
fn an_earlier_attempts_business_failure_compensates_what_may_have_run() {
    let mut saga = SagaTest::given();
    saga.succeeds("create_order", 1);
    saga.tick_at_wake_at().expect(&[]);
    saga.tick_at_wake_at().expect(&[charge_payment(2)]);
    // Attempt 1 timed out, so the step is compensated too (the barrier makes
    // that refund a no-op).
    saga.fails("charge_payment", 1)
        .expect(&[refund_payment(1)])
        .expect_status(SagaStatus::Compensating);
    saga.fails("charge_payment", 2).expect_ignored();
}

#[test]
fn an_earlier_compensations_success_settles_it() {
    let mut saga = SagaTest::given();
    saga.succeeds("create_order", 1);
    saga.fails("charge_payment", 1).expect(&[cancel_order(1)]);
    saga.tick_at_wake_at().expect(&[]); // cancel attempt 1 timed out
    // A failure of attempt 1 says nothing new; its success settles the step.
    saga.compensation_fails("create_order", 1).expect_ignored();
    saga.compensated("create_order", 1)
        .expect(&[])
        .expect_status(SagaStatus::Compensated);

    let mut saga = SagaTest::given();
    saga.succeeds("create_order", 1);
    saga.fails("charge_payment", 1).expect(&[cancel_order(1)]);
    saga.tick_at_wake_at().expect(&[]);
    saga.tick_at_wake_at().expect(&[cancel_order(2)]);
    saga.compensated("create_order", 1)
        .expect(&[])
        .expect_status(SagaStatus::Compensated);
}

#[test]
fn duplicate_reply_is_ignored() {
    let mut saga = SagaTest::given();
    saga.succeeds("create_order", 1).expect(&[charge_payment(1)]);
    saga.succeeds("create_order", 1).expect_ignored();

    // The same transient failure twice, during the backoff it started.
    saga.fails_transiently("charge_payment", 1).expect(&[]);
    saga.fails_transiently("charge_payment", 1).expect_ignored();
    saga.tick_at_wake_at().expect(&[charge_payment(2)]);
    saga.fails_transiently("charge_payment", 1).expect_ignored();

    saga.fails("charge_payment", 2).expect(&[cancel_order(1)]);
    saga.fails("charge_payment", 2).expect_ignored();

    // The same compensation failure twice.
    saga.compensation_fails("create_order", 1).expect(&[]);
    saga.compensation_fails("create_order", 1).expect_ignored();
    saga.tick_at_wake_at().expect(&[cancel_order(2)]);

    saga.compensated("create_order", 2)
        .expect_status(SagaStatus::Compensated);
    saga.compensated("create_order", 2).expect_ignored();
    saga.fails("charge_payment", 2).expect_ignored();
}

#[test]
fn compensation_that_keeps_failing_gets_stuck_until_an_operator_retries() {
    let mut saga = SagaTest::given();
    saga.succeeds("create_order", 1)
        .fails("charge_payment", 1)
        .expect(&[cancel_order(1)]);

    // Failure 1: retried after the first compensation backoff (2s * 3/4).
    let failed_at = saga.now;
    saga.compensation_fails("create_order", 1)
        .expect(&[])
        .expect_status(SagaStatus::Compensating)
        .expect_wake_at(failed_at + secs(1.5));
    assert_eq!(saga.step_status("create_order"), StepStatus::CompensationWait);
    saga.wait(secs(1.0)).tick().expect_ignored();
    saga.tick_at_wake_at()
        .expect(&[cancel_order(2)])
        .expect_wake_at(failed_at + secs(1.5) + COMPENSATION_TIMEOUT);

    // Failure 2: the attempt times out.
    saga.tick_at_wake_at()
        .expect(&[])
        .expect_status(SagaStatus::Compensating);
    saga.tick_at_wake_at().expect(&[cancel_order(3)]);

    // Failure 3 of 3 in a row: an operator must look.
    saga.compensation_fails("create_order", 3)
        .expect(&[])
        .expect_status(SagaStatus::Stuck);
    let stuck = saga.state.clone();
    saga.wait(secs(3600.0)).tick().expect_ignored();
    saga.compensated("create_order", 3).expect_ignored();
    assert_eq!(saga.state, stuck);

    saga.when(Event::Retry)
        .expect(&[cancel_order(4)])
        .expect_status(SagaStatus::Compensating);
    assert_eq!(saga.state.wake_at, Some(saga.now + COMPENSATION_TIMEOUT));
    // The retried compensation gets a fresh budget of failures.
    saga.compensation_fails("create_order", 4)
        .expect(&[])
        .expect_status(SagaStatus::Compensating);
    saga.tick_at_wake_at().expect(&[cancel_order(5)]);
    saga.compensated("create_order", 5)
        .expect(&[])
        .expect_status(SagaStatus::Compensated);
    assert_eq!(saga.state.steps[0].compensations.len(), 5);
}

#[test]
fn stuck_compensation_resumes_with_the_steps_before_it() {
    let mut saga = two_steps_done();
    saga.fails("reserve_stock", 1).expect(&[refund_payment(1)]);
    for attempt in 1..=3 {
        if attempt > 1 {
            saga.tick_at_wake_at().expect(&[refund_payment(attempt)]);
        }
        saga.compensation_fails("charge_payment", attempt);
    }
    saga.expect_status(SagaStatus::Stuck);
    saga.when(Event::Retry).expect(&[refund_payment(4)]);
    saga.compensated("charge_payment", 4).expect(&[cancel_order(1)]);
    saga.compensated("create_order", 1)
        .expect(&[])
        .expect_status(SagaStatus::Compensated);
}

#[test]
fn abort_with_an_attempt_in_flight_compensates_that_step_too() {
    let mut saga = SagaTest::given();
    saga.succeeds("create_order", 1).expect(&[charge_payment(1)]);
    saga.when(Event::Abort {
        reason: "customer called".into(),
    })
    .expect(&[refund_payment(1)])
    .expect_status(SagaStatus::Compensating);
    assert_eq!(
        saga.action_outcomes("charge_payment"),
        [Some(AttemptOutcome::Abandoned)]
    );
    let reason = saga.state.failure.clone().expect("the abort is recorded");
    assert!(reason.contains("customer called"), "{reason}");

    // The abandoned attempt answers after all: too late.
    saga.succeeds("charge_payment", 1).expect_ignored();

    saga.compensated("charge_payment", 1).expect(&[cancel_order(1)]);
    saga.compensated("create_order", 1)
        .expect(&[])
        .expect_status(SagaStatus::Compensated);
}

#[test]
fn abort_while_backing_off_compensates_only_the_steps_that_may_have_run() {
    let mut saga = SagaTest::given();
    saga.succeeds("create_order", 1)
        .fails_transiently("charge_payment", 1)
        .expect(&[]);
    let retry_at = saga.state.wake_at.expect("backing off");
    let aborted_at = saga.now;
    saga.when(Event::Abort {
        reason: "enough".into(),
    })
    .expect(&[cancel_order(1)])
    .expect_status(SagaStatus::Compensating)
    .expect_wake_at(aborted_at + COMPENSATION_TIMEOUT);
    assert_eq!(saga.step_status("charge_payment"), StepStatus::Failed);
    // The end of the backoff no longer sends an attempt.
    saga.now = retry_at;
    saga.tick().expect_ignored();
    saga.compensated("create_order", 1)
        .expect(&[])
        .expect_status(SagaStatus::Compensated);
}

#[test]
fn abort_of_the_first_step_in_flight_compensates_it() {
    let mut saga = SagaTest::given();
    saga.when(Event::Abort { reason: "test".into() })
        .expect(&[cancel_order(1)]);
    saga.compensated("create_order", 1)
        .expect_status(SagaStatus::Compensated);
}

#[test]
fn retry_of_a_saga_that_is_not_stuck_is_refused() {
    let retry_refused = |status: &'static str| EngineError::InvalidOperatorAction {
        action: "retry",
        status,
    };
    let mut saga = SagaTest::given();
    assert_eq!(saga.rejects(Event::Retry), retry_refused("RUNNING"));

    saga.succeeds("create_order", 1).fails("charge_payment", 1);
    assert_eq!(saga.rejects(Event::Retry), retry_refused("COMPENSATING"));

    saga.compensated("create_order", 1);
    assert_eq!(saga.rejects(Event::Retry), retry_refused("COMPENSATED"));

    let mut saga = two_steps_done();
    saga.succeeds("reserve_stock", 1).succeeds("approve_order", 1);
    assert_eq!(saga.rejects(Event::Retry), retry_refused("COMPLETED"));
}

#[test]
fn abort_of_a_saga_that_is_not_running_is_refused() {
    let abort = || Event::Abort { reason: "late".into() };
    let abort_refused = |status: &'static str| EngineError::InvalidOperatorAction {
        action: "abort",
        status,
    };

    let mut saga = two_steps_done();
    saga.succeeds("reserve_stock", 1).succeeds("approve_order", 1);
    assert_eq!(saga.rejects(abort()), abort_refused("COMPLETED"));

    let mut saga = SagaTest::given();
    saga.succeeds("create_order", 1).fails("charge_payment", 1);
    assert_eq!(saga.rejects(abort()), abort_refused("COMPENSATING"));
    for attempt in 1..=3 {
        if attempt > 1 {
            saga.tick_at_wake_at();
        }
        saga.compensation_fails("create_order", attempt);
    }
    saga.expect_status(SagaStatus::Stuck);
    assert_eq!(saga.rejects(abort()), abort_refused("STUCK"));

    saga.when(Event::Retry).compensated("create_order", 4);
    saga.expect_status(SagaStatus::Compensated);
    assert_eq!(saga.rejects(abort()), abort_refused("COMPENSATED"));
}

#[test]
fn reply_naming_an_unknown_step_is_an_error() {
    let mut saga = SagaTest::given();
    for kind in [Kind::Action, Kind::Compensation] {
        assert_eq!(
            saga.rejects(reply("ship_order", 1, kind, success())),
            EngineError::UnknownStep {
                saga_type: "order".into(),
                step: "ship_order".into(),
            }
        );
    }
}

#[test]
fn state_of_another_definition_is_an_error() {
    let saga = SagaTest::given();
    let other = SagaDefinition::builder("other")
        .step("only")
        .invoke("order", "Only")
        .build()
        .expect("valid definition");
    let ctx = Ctx { now: t0(), jitter: 0.0 };
    assert_eq!(
        apply(&other, saga.state.clone(), Event::Tick, ctx),
        Err(EngineError::StateMismatch("other".into()))
    );
}

#[test]
fn state_round_trips_through_json_at_every_stage() {
    fn round_trip(saga: &SagaTest) {
        let json = serde_json::to_string(&saga.state).expect("serializable");
        let back: SagaState = serde_json::from_str(&json).expect("deserializable");
        assert_eq!(back, saga.state, "{json}");
        let value: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
        assert_eq!(value["status"], saga.state.status.as_str());
    }

    let mut saga = SagaTest::given();
    round_trip(&saga);
    saga.when(reply(
        "create_order",
        1,
        Kind::Action,
        Outcome::Success {
            data: json!({"order_id": 7, "lines": [1, 2]}),
        },
    ));
    round_trip(&saga);
    saga.fails_transiently("charge_payment", 1);
    round_trip(&saga);
    saga.tick_at_wake_at().tick_at_wake_at(); // attempt 2 timed out
    round_trip(&saga);
    saga.tick_at_wake_at().fails("charge_payment", 3); // compensating
    round_trip(&saga);
    for attempt in 1..=3 {
        if attempt > 1 {
            saga.tick_at_wake_at();
        }
        saga.compensation_fails("charge_payment", attempt);
    }
    saga.expect_status(SagaStatus::Stuck);
    round_trip(&saga);

    // A saga loaded back from JSON carries on exactly like the original.
    let json = serde_json::to_string(&saga.state).expect("serializable");
    let mut reloaded = SagaTest::given();
    reloaded.state = serde_json::from_str(&json).expect("deserializable");
    reloaded.now = saga.now;
    saga.when(Event::Retry);
    reloaded.when(Event::Retry);
    assert_eq!(reloaded.sent, saga.sent);
    assert_eq!(reloaded.state, saga.state);
    saga.compensated("charge_payment", 4).compensated("create_order", 1);
    saga.expect_status(SagaStatus::Compensated);
    round_trip(&saga);
}
