//! Domain newtypes of the orders API. They are built only by parsing, so a
//! value of these types is valid by construction; raw strings stop here.

use serde::{Deserialize, Serialize};

/// Why a request was refused; the message names the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValidationError(pub String);

fn invalid(msg: impl Into<String>) -> ValidationError {
    ValidationError(msg.into())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct CustomerId(String);

impl CustomerId {
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
        ok.then(|| Self(s.to_owned()))
            .ok_or_else(|| invalid("customer_id must be 1-64 characters of letters, digits, '-', '_', '.', ':'"))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// ISO 4217 code: three upper-case letters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Currency(String);

impl Currency {
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        (s.len() == 3 && s.bytes().all(|b| b.is_ascii_uppercase()))
            .then(|| Self(s.to_owned()))
            .ok_or_else(|| invalid("currency must be a three-letter upper-case ISO 4217 code such as EUR"))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Sku(String);

impl Sku {
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        ok.then(|| Self(s.to_owned()))
            .ok_or_else(|| invalid("sku must be 1-64 characters of letters, digits, '-', '_', '.'"))
    }
}

/// A quantity of one line: 1 to 10,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Quantity(i64);

impl Quantity {
    pub const MAX: i64 = 10_000;
    pub fn parse(n: i64) -> Result<Self, ValidationError> {
        (1..=Self::MAX)
            .contains(&n)
            .then_some(Self(n))
            .ok_or_else(|| invalid(format!("quantity must be between 1 and {}", Self::MAX)))
    }
    pub fn get(self) -> i64 {
        self.0
    }
}

/// An amount of money in the currency's minor unit; never negative.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Cents(i64);

impl Cents {
    /// Ten million in major units: a bound that keeps totals far from overflow.
    pub const MAX: i64 = 1_000_000_000;
    pub fn parse(n: i64) -> Result<Self, ValidationError> {
        (0..=Self::MAX)
            .contains(&n)
            .then_some(Self(n))
            .ok_or_else(|| invalid(format!("amounts must be between 0 and {} cents", Self::MAX)))
    }
    pub fn get(self) -> i64 {
        self.0
    }
}

/// The `Idempotency-Key` header: 1-200 visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        let ok = !s.is_empty() && s.len() <= 200 && s.bytes().all(|b| b.is_ascii_graphic());
        ok.then(|| Self(s.to_owned()))
            .ok_or_else(|| invalid("Idempotency-Key must be 1-200 visible ASCII characters"))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `POST /v1/orders` as received (unchecked). The schema states the rules
/// that [`NewOrder::parse`] enforces on each field; two more span fields:
/// SKUs must differ, and the total (quantity times unit price, summed) must
/// not exceed 1,000,000,000 cents.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderRequest {
    #[schema(pattern = "^[A-Za-z0-9._:-]{1,64}$", example = "c-1")]
    pub customer_id: String,
    /// ISO 4217.
    #[schema(pattern = "^[A-Z]{3}$", example = "EUR")]
    pub currency: String,
    /// Distinct SKUs.
    #[schema(min_items = 1, max_items = 100)]
    pub items: Vec<OrderLineRequest>,
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderLineRequest {
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$", example = "sku-1")]
    pub sku: String,
    #[schema(minimum = 1, maximum = 10000, example = 2)]
    pub quantity: i64,
    /// Price of one unit in the currency's minor unit.
    #[schema(minimum = 0, maximum = 1000000000, example = 1250)]
    pub unit_price_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OrderLine {
    pub sku: Sku,
    pub quantity: Quantity,
    pub unit_price_cents: Cents,
}

/// A valid order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NewOrder {
    pub customer_id: CustomerId,
    pub currency: Currency,
    pub items: Vec<OrderLine>,
    pub total_cents: Cents,
}

impl NewOrder {
    pub const MAX_LINES: usize = 100;

    pub fn parse(req: OrderRequest) -> Result<Self, ValidationError> {
        let customer_id = CustomerId::parse(&req.customer_id)?;
        let currency = Currency::parse(&req.currency)?;
        if req.items.is_empty() {
            return Err(invalid("items must not be empty"));
        }
        if req.items.len() > Self::MAX_LINES {
            return Err(invalid(format!("at most {} items per order", Self::MAX_LINES)));
        }
        let mut items = Vec::with_capacity(req.items.len());
        let mut total: i64 = 0;
        for (i, line) in req.items.iter().enumerate() {
            let at = |e: ValidationError| invalid(format!("items[{i}]: {}", e.0));
            let sku = Sku::parse(&line.sku).map_err(at)?;
            if items.iter().any(|l: &OrderLine| l.sku == sku) {
                return Err(invalid(format!("items[{i}]: sku {:?} appears twice", line.sku)));
            }
            let quantity = Quantity::parse(line.quantity).map_err(at)?;
            let unit_price_cents = Cents::parse(line.unit_price_cents).map_err(at)?;
            total = total
                .checked_add(quantity.get() * unit_price_cents.get())
                .ok_or_else(|| invalid("order total overflows"))?;
            items.push(OrderLine {
                sku,
                quantity,
                unit_price_cents,
            });
        }
        let total_cents = Cents::parse(total).map_err(|_| invalid("order total is too large"))?;
        Ok(Self {
            customer_id,
            currency,
            items,
            total_cents,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(items: Vec<(&str, i64, i64)>) -> OrderRequest {
        OrderRequest {
            customer_id: "c-1".into(),
            currency: "EUR".into(),
            items: items
                .into_iter()
                .map(|(sku, quantity, unit_price_cents)| OrderLineRequest {
                    sku: sku.into(),
                    quantity,
                    unit_price_cents,
                })
                .collect(),
        }
    }

    #[test]
    fn parses_a_valid_order_and_totals_it() {
        let o = NewOrder::parse(req(vec![("a", 2, 1250), ("b", 1, 100)])).unwrap();
        assert_eq!(o.total_cents.get(), 2600);
    }

    #[test]
    fn refuses_bad_orders_with_a_message_naming_the_field() {
        assert!(NewOrder::parse(req(vec![])).unwrap_err().0.contains("items"));
        assert!(
            NewOrder::parse(req(vec![("a", -1, 1)]))
                .unwrap_err()
                .0
                .contains("items[0]: quantity")
        );
        assert!(NewOrder::parse(req(vec![("a", 0, 1)])).is_err());
        assert!(
            NewOrder::parse(req(vec![("a", 1, -5)]))
                .unwrap_err()
                .0
                .contains("amounts")
        );
        assert!(
            NewOrder::parse(req(vec![("a", 1, 1), ("a", 1, 1)]))
                .unwrap_err()
                .0
                .contains("twice")
        );
        assert!(NewOrder::parse(req(vec![("", 1, 1)])).unwrap_err().0.contains("sku"));
        let mut r = req(vec![("a", 1, 1)]);
        r.currency = "eur".into();
        assert!(NewOrder::parse(r).unwrap_err().0.contains("currency"));
        let mut r = req(vec![("a", 1, 1)]);
        r.customer_id = String::new();
        assert!(NewOrder::parse(r).unwrap_err().0.contains("customer_id"));
        assert!(NewOrder::parse(req(vec![("a", 10_000, Cents::MAX)])).is_err());
        assert!(IdempotencyKey::parse("").is_err());
        assert!(IdempotencyKey::parse("k 1").is_err());
    }
}
