//! Where a saga's time goes: each step split into its two legs.
//!
//! - **to participant**: from the coordinator's decision to send the step
//!   (the attempt's `sent_at`, taken by the engine just before the write that
//!   commits the command to the outbox) to the beginning of the participant's
//!   transaction that handled it (the `created_at` of its barrier row, which
//!   is PostgreSQL's `now()`: the transaction's start). This covers the
//!   coordinator's commit, its relay, the broker, and the wait for the
//!   participant's batch (and, for `order`, its Redis locks).
//! - **back**: from there to the coordinator applying the reply (the
//!   attempt's `finished_at`): the participant's transaction, its relay,
//!   the broker, and the wait for the coordinator's reply batch.
//!
//! Only steps settled by their first attempt count (a retry would mix two
//! attempts' times), and only actions (a compensation's barrier row may be a
//! tombstone). Both ends are read on one machine's clocks here; across
//! machines a clock skew moves time from one leg to the other, not the sum.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::phase::Latency;

/// One step's two legs over a phase's sagas.
#[derive(Debug, Clone, Serialize)]
pub struct Leg {
    pub step: String,
    pub participant: String,
    /// Steps measured (settled by their first attempt, barrier row found).
    pub count: usize,
    pub to_participant_ms: Latency,
    pub back_ms: Latency,
}

/// A step's first attempt, as the coordinator recorded it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Attempt {
    pub saga_id: Uuid,
    /// The step's position in its saga, to list the legs in saga order.
    pub position: i64,
    pub step: String,
    pub sent_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

/// When a participant's transaction for a step began, by (saga, step).
pub type Barriers = HashMap<(Uuid, String), (String, DateTime<Utc>)>;

/// Reads the attempts of `ids` from the coordinator's database and the
/// barrier rows from each participant's, and splits every step.
pub async fn measure(
    coordinator: &PgPool,
    participants: &[(String, PgPool)],
    ids: &[Uuid],
) -> anyhow::Result<Vec<Leg>> {
    let attempts: Vec<Attempt> = sqlx::query_as(
        "SELECT s.id AS saga_id, t.n AS position, t.st->>'name' AS step,
                (t.st->'attempts'->0->>'sent_at')::timestamptz AS sent_at,
                (t.st->'attempts'->0->>'finished_at')::timestamptz AS finished_at
         FROM sagas s
         CROSS JOIN LATERAL jsonb_array_elements(s.state->'steps') WITH ORDINALITY AS t(st, n)
         WHERE s.id = ANY($1)
           AND jsonb_array_length(t.st->'attempts') = 1
           AND t.st->'attempts'->0->>'finished_at' IS NOT NULL",
    )
    .bind(ids)
    .fetch_all(coordinator)
    .await
    .context("reading the steps' first attempts")?;
    let mut barriers = Barriers::new();
    for (name, pool) in participants {
        let rows: Vec<(Uuid, String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT saga_id, step, created_at FROM inbox
             WHERE saga_id = ANY($1) AND kind = 'action' AND NOT tombstone",
        )
        .bind(ids)
        .fetch_all(pool)
        .await
        .with_context(|| format!("reading the {name} participant's barrier rows"))?;
        barriers.extend(
            rows.into_iter()
                .map(|(saga, step, began)| ((saga, step), (name.clone(), began))),
        );
    }
    Ok(split(attempts, &barriers))
}

/// Splits each attempt at its participant's transaction start; steps in
/// saga order. An attempt with no barrier row is left out.
pub fn split(attempts: Vec<Attempt>, barriers: &Barriers) -> Vec<Leg> {
    // step -> (position, participant, to participant, back)
    let mut by_step: HashMap<String, (i64, String, Vec<Duration>, Vec<Duration>)> = HashMap::new();
    for a in attempts {
        let Some((participant, began)) = barriers.get(&(a.saga_id, a.step.clone())) else {
            continue;
        };
        let entry = by_step
            .entry(a.step)
            .or_insert_with(|| (a.position, participant.clone(), Vec::new(), Vec::new()));
        entry.2.push(non_negative(*began - a.sent_at));
        entry.3.push(non_negative(a.finished_at - *began));
    }
    let mut legs: Vec<(i64, Leg)> = by_step
        .into_iter()
        .map(|(step, (position, participant, to, back))| {
            (
                position,
                Leg {
                    step,
                    participant,
                    count: to.len(),
                    to_participant_ms: Latency::of(to),
                    back_ms: Latency::of(back),
                },
            )
        })
        .collect();
    legs.sort_by_key(|(position, _)| *position);
    legs.into_iter().map(|(_, leg)| leg).collect()
}

/// Clocks read a microsecond apart may disagree by as much: no negative legs.
fn non_negative(d: chrono::TimeDelta) -> Duration {
    d.to_std().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_800_000_000_000 + ms).unwrap()
    }

    fn attempt(saga: Uuid, position: i64, step: &str, sent: i64, finished: i64) -> Attempt {
        Attempt {
            saga_id: saga,
            position,
            step: step.to_owned(),
            sent_at: at(sent),
            finished_at: at(finished),
        }
    }

    #[test]
    fn splits_each_step_at_the_participants_transaction_start() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let attempts = vec![
            attempt(a, 2, "charge_payment", 30, 50),
            attempt(a, 1, "create_order", 0, 30),
            attempt(b, 1, "create_order", 100, 110),
            // No barrier row (a retry, or read before it committed): left out.
            attempt(b, 2, "charge_payment", 110, 200),
        ];
        let barriers: Barriers = [
            ((a, "create_order".to_owned()), ("order".to_owned(), at(20))),
            ((a, "charge_payment".to_owned()), ("payment".to_owned(), at(35))),
            ((b, "create_order".to_owned()), ("order".to_owned(), at(104))),
        ]
        .into_iter()
        .collect();
        let legs = split(attempts, &barriers);
        let steps: Vec<(&str, &str, usize)> = legs
            .iter()
            .map(|l| (l.step.as_str(), l.participant.as_str(), l.count))
            .collect();
        assert_eq!(
            steps,
            [("create_order", "order", 2), ("charge_payment", "payment", 1)],
            "in saga order, with the step left out that has no barrier row"
        );
        // create_order: to participant 20 and 4 ms, back 10 and 6 ms.
        assert_eq!(legs[0].to_participant_ms.max, 20.0);
        assert_eq!(legs[0].to_participant_ms.p50, 4.0);
        assert_eq!(legs[0].back_ms.max, 10.0);
        assert_eq!(legs[0].back_ms.p50, 6.0);
        assert_eq!(legs[1].to_participant_ms.max, 5.0);
        assert_eq!(legs[1].back_ms.max, 15.0);
    }

    #[test]
    fn a_clock_a_little_behind_gives_zero_not_a_negative_leg() {
        let saga = Uuid::now_v7();
        let barriers: Barriers = [((saga, "create_order".to_owned()), ("order".to_owned(), at(-1)))]
            .into_iter()
            .collect();
        let legs = split(vec![attempt(saga, 1, "create_order", 0, 5)], &barriers);
        assert_eq!(legs[0].to_participant_ms.max, 0.0);
        assert_eq!(legs[0].back_ms.max, 6.0);
    }
}
