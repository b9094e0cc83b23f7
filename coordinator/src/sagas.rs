//! The saga definitions this coordinator runs, as data. The order saga is
//! one of them; the engine knows nothing about orders.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use skald_engine::{DefinitionError, RetryPolicy, SagaDefinition};

/// The order saga of DESIGN.md.
#[rustfmt::skip]
pub fn order_saga(
    step_timeout: Duration,
    retry: RetryPolicy,
    compensation: RetryPolicy,
) -> Result<SagaDefinition, DefinitionError> {
    SagaDefinition::builder("order")
        .default_timeout(step_timeout)
        .default_retry(retry)
        .compensation_retry(compensation, step_timeout)
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
}

/// Definitions by saga type.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    by_type: HashMap<String, Arc<SagaDefinition>>,
}

impl Registry {
    pub fn with(mut self, def: SagaDefinition) -> Self {
        self.by_type.insert(def.name().to_owned(), Arc::new(def));
        self
    }
    pub fn get(&self, saga_type: &str) -> Option<&Arc<SagaDefinition>> {
        self.by_type.get(saga_type)
    }
    /// The saga types, sorted.
    pub fn types(&self) -> Vec<String> {
        let mut out: Vec<String> = self.by_type.keys().cloned().collect();
        out.sort();
        out
    }
    /// Every participant some definition sends commands to (their queues are declared at start).
    pub fn participants(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .by_type
            .values()
            .flat_map(|d| d.steps().iter())
            .flat_map(|s| {
                std::iter::once(s.participant.as_str().to_owned())
                    .chain(s.compensation.iter().map(|(p, _)| p.as_str().to_owned()))
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }
}
