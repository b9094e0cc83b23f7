//! Group commit of new orders: `POST /v1/orders` requests that arrive
//! together are written by one statement in one transaction (their keys,
//! sagas, orders and first commands), instead of a commit each.
//!
//! One task takes what is waiting (and, while orders keep coming, what
//! arrives within the linger, `INTAKE_LINGER_MS`), writes it with
//! [`Store::create_orders`], and answers each request. Orders keep coming
//! when one arrives less than a linger after the previous batch left: at a
//! few hundred orders a second and more; below that an order is written at
//! once. If the batch statement fails, each order of the batch is written
//! on its own, so each request gets its own answer or error.

use std::time::Duration;

use skald_wire::alarm::Alarm;
use skald_wire::linger::Linger;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::domain::{IdempotencyKey, NewOrder};
use crate::store::{Created, Error, OrderToCreate, Result, Store};

/// One order waiting to be written, and where its answer goes.
struct PendingOrder {
    request: OrderToCreate,
    answer: oneshot::Sender<Result<Created>>,
}

/// The sending side, cloned into every HTTP handler. The task ends when
/// every clone is dropped (after the HTTP server stopped).
#[derive(Clone)]
pub struct OrderIntake {
    tx: mpsc::Sender<PendingOrder>,
}

impl OrderIntake {
    /// Starts the writer task; `max_batch` orders per statement at most,
    /// and a batch waits up to `linger` for more once it has one.
    pub fn spawn(store: Store, max_batch: usize, linger: Duration) -> (Self, JoinHandle<()>) {
        let max_batch = max_batch.max(1);
        let (tx, rx) = mpsc::channel(max_batch * 4);
        let task = tokio::spawn(write_batches(store, rx, max_batch, linger));
        (Self { tx }, task)
    }

    /// Records an order and starts its saga (see [`Store::create_order`]).
    pub async fn create(&self, order: NewOrder, key: Option<IdempotencyKey>, request_hash: String) -> Result<Created> {
        let (answer, answered) = oneshot::channel();
        let pending = PendingOrder {
            request: OrderToCreate {
                order,
                key,
                request_hash,
            },
            answer,
        };
        self.tx.send(pending).await.map_err(|_| Error::IntakeClosed)?;
        answered.await.map_err(|_| Error::IntakeClosed)?
    }
}

/// Batches written at once at most: a new batch forms while others commit.
const WRITERS: usize = 4;

async fn write_batches(store: Store, mut rx: mpsc::Receiver<PendingOrder>, max_batch: usize, linger: Duration) {
    let writers = std::sync::Arc::new(tokio::sync::Semaphore::new(WRITERS));
    let mut linger = Linger::with_busy_gap(linger, linger);
    let alarm = Alarm::new();
    let mut running = tokio::task::JoinSet::new();
    loop {
        let Ok(permit) = writers.clone().acquire_owned().await else {
            break;
        };
        let mut batch = Vec::with_capacity(max_batch);
        if rx.recv_many(&mut batch, max_batch).await == 0 {
            break;
        }
        let wait = linger.begin();
        // One wait for the whole linger, armed once (at its first poll).
        let over = alarm.sleep_until(tokio::time::Instant::now() + wait);
        tokio::pin!(over);
        while !wait.is_zero() && batch.len() < max_batch {
            let more = max_batch - batch.len();
            let n = tokio::select! {
                biased;
                n = rx.recv_many(&mut batch, more) => n,
                () = &mut over => 0,
            };
            if n == 0 {
                break; // the linger is over, or the intake closed
            }
        }
        let store = store.clone();
        running.spawn(async move {
            write_batch(&store, batch).await;
            drop(permit);
        });
        linger.end();
        // Reap the finished ones so the set stays small.
        while running.try_join_next().is_some() {}
    }
    while running.join_next().await.is_some() {}
}

async fn write_batch(store: &Store, batch: Vec<PendingOrder>) {
    let requests: Vec<&OrderToCreate> = batch.iter().map(|p| &p.request).collect();
    let results = match store.create_orders(&requests).await {
        Ok(results) => results,
        Err(e) if requests.len() > 1 => {
            tracing::warn!(error = %e, orders = requests.len(), "order batch failed; writing its orders one by one");
            let mut results = Vec::with_capacity(requests.len());
            for request in &requests {
                results.push(store.create_order(request).await);
            }
            results
        }
        Err(e) => vec![Err(e)],
    };
    for (pending, result) in batch.into_iter().zip(results) {
        // The client may have gone away: its order stands anyway.
        let _ = pending.answer.send(result);
    }
}
