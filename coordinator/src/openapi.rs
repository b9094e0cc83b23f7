//! The parts of the OpenAPI document that no handler carries: title,
//! version, tags and the bearer security scheme of operator actions. The
//! paths and schemas come from the handlers' annotations ([`crate::http`]).

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Skald coordinator",
        description = "Saga orchestrator: orders API, sagas, operator actions, dead letters and participant queues. \
Errors are `{\"error\": {\"code\", \"message\"}}`. Operator actions need `Authorization: Bearer <ADMIN_TOKEN>`.",
        license(name = "Apache-2.0"),
    ),
    modifiers(&BearerScheme),
    tags(
        (name = "orders", description = "Start order sagas and follow their orders."),
        (name = "sagas", description = "Sagas: one, a filtered list, counts."),
        (name = "operator", description = "Operator actions (bearer token: ADMIN_TOKEN)."),
        (name = "dead-letters", description = "Messages that could not be processed."),
        (name = "participants", description = "Participant command queues as RabbitMQ sees them."),
        (name = "health", description = "Liveness and readiness."),
    )
)]
struct ApiDoc;

/// Declares the `bearer` scheme that operator actions name.
struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The coordinator's ADMIN_TOKEN. Unset on the server: 403."))
                    .build(),
            ),
        );
    }
}

/// The document before the routes are added.
pub fn base() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    #[test]
    fn the_document_has_every_route_the_error_shape_and_the_bearer_scheme() {
        let doc = serde_json::to_value(crate::http::openapi_document()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        let mut listed: Vec<&str> = paths.keys().map(String::as_str).collect();
        listed.sort();
        assert_eq!(
            listed,
            [
                "/healthz",
                "/readyz",
                "/v1/dead-letters",
                "/v1/dead-letters/{message_id}/replay",
                "/v1/orders",
                "/v1/orders/{id}",
                "/v1/participants",
                "/v1/sagas",
                "/v1/sagas/{id}",
                "/v1/sagas/{id}/abort",
                "/v1/sagas/{id}/retry",
                "/v1/stats",
            ]
        );
        assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
        for (path, method) in [
            ("/v1/sagas/{id}/retry", "post"),
            ("/v1/sagas/{id}/abort", "post"),
            ("/v1/dead-letters/{message_id}/replay", "post"),
        ] {
            let op = &paths[path][method];
            assert_eq!(op["security"][0]["bearer"], Value::Array(vec![]), "{path}");
            for code in ["401", "403"] {
                assert!(op["responses"][code].is_object(), "{path} documents {code}");
            }
        }
        assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
        assert!(doc["components"]["schemas"]["StepState"].is_object());
        if let Ok(out) = std::env::var("SKALD_OPENAPI_OUT") {
            std::fs::write(out, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
        }
    }
}
