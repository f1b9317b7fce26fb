//! `GET /ops`: the on-call engineer's page. Plain HTML, CSS and JavaScript embedded in
//! the binary (nothing is fetched from anywhere else; the Content-Security-Policy
//! forbids it). The page has no login of its own: it asks for the admin token, keeps it
//! in the tab's sessionStorage and sends it as Bearer to `/v1/ops/*`.

use axum::http::header;
use axum::response::IntoResponse;

pub const PAGE: &str = include_str!("../assets/ops.html");

const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
     connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

#[utoipa::path(get, path = "/ops", operation_id = "opsPage", tag = "operator")]
pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        PAGE,
    )
}
