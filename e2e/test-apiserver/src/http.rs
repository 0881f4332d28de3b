//! The HTTP layer: authentication, URL routing, query parameters, and
//! turning API results into responses.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Bytes, Frame, Incoming};
use serde::Serialize;
use serde_json::Value;

use crate::api::{Api, DeleteOptions, ListQuery, PatchBody, Propagation, Target};
use crate::discovery;
use crate::error::ApiError;
use crate::resources::ResourceId;
use crate::selectors::{FieldSelector, LabelSelector, Selectors};
use crate::watch::{self, WatchRequest};

/// A response body: a whole JSON document or a watch stream.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// What the handlers need besides the API.
#[derive(Debug)]
pub struct HttpState {
    /// Object semantics.
    pub api: Arc<Api>,
    /// Bearer tokens → user names.
    pub tokens: std::sync::Mutex<HashMap<String, String>>,
    /// `host:port` clients reach the server at (for `/api`).
    pub server_address: String,
    /// How often watches send bookmarks (when the client allows them).
    pub bookmark_interval: Duration,
}

/// Builds a JSON response.
pub fn json_response(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(bytes)).boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Builds a Status error response.
pub fn error_response(error: &ApiError) -> Response<Body> {
    json_response(
        StatusCode::from_u16(error.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &error.to_status(),
    )
}

/// Decodes `%XX` escapes and `+` in a query component.
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(hi), Some(lo)) => {
                        out.push((hi * 16 + lo) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses a query string into a map (last value wins).
pub fn parse_query(query: Option<&str>) -> HashMap<String, String> {
    query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(pair), String::new()),
        })
        .collect()
}

enum Route {
    Version,
    CoreVersions,
    Groups,
    Group(String),
    Resources(String, String),
    Collection {
        res: ResourceId,
        namespace: Option<String>,
    },
    Object(Target),
}

fn route(api: &Api, path: &str) -> Result<Route, ApiError> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let not_found = || ApiError::path_not_found(path);
    let (group, version, rest) = match segments.as_slice() {
        ["version"] => return Ok(Route::Version),
        ["api"] => return Ok(Route::CoreVersions),
        ["apis"] => return Ok(Route::Groups),
        ["apis", group] => return Ok(Route::Group(group.to_string())),
        ["api", version] => return Ok(Route::Resources(String::new(), version.to_string())),
        ["apis", group, version] => {
            return Ok(Route::Resources(group.to_string(), version.to_string()));
        }
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(not_found()),
    };
    let find = |plural: &str| {
        api.registry
            .find(group, version, plural)
            .ok_or_else(not_found)
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, tail @ ..] if !matches!(*plural, "status" | "finalize") => {
            (Some(ns.to_string()), [&[*plural][..], tail].concat())
        }
        _ => (None, rest.to_vec()),
    };
    let object = |res: ResourceId, name: &str, status: bool| {
        Ok(Route::Object(Target {
            res,
            namespace: namespace.clone(),
            name: name.to_string(),
            status,
        }))
    };
    match rest.as_slice() {
        [plural] => Ok(Route::Collection {
            res: find(plural)?,
            namespace,
        }),
        [plural, name] => object(find(plural)?, name, false),
        [plural, name, "status"] => {
            let res = find(plural)?;
            if !api.registry.get(res).status_subresource {
                return Err(not_found());
            }
            object(res, name, true)
        }
        _ => Err(not_found()),
    }
}

fn selectors(query: &HashMap<String, String>) -> Result<Selectors, ApiError> {
    Ok(Selectors {
        labels: LabelSelector::parse(
            query
                .get("labelSelector")
                .map(String::as_str)
                .unwrap_or_default(),
        )?,
        fields: FieldSelector::parse(
            query
                .get("fieldSelector")
                .map(String::as_str)
                .unwrap_or_default(),
        )?,
    })
}

fn truthy(query: &HashMap<String, String>, key: &str) -> bool {
    query.get(key).is_some_and(|v| v == "true" || v == "1")
}

fn parse_body(bytes: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// The authenticated user for a request, if its bearer token is known.
fn authenticate(state: &HttpState, request: &Request<Incoming>) -> Option<String> {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")?;
    crate::faults::lock(&state.tokens)
        .get(token.trim())
        .cloned()
}

/// Serves one API request.
pub async fn serve(
    state: Arc<HttpState>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    use tracing::Instrument as _;
    let span = tracing::debug_span!(
        "api_request",
        method = %request.method(),
        path = %request.uri().path(),
    );
    async move {
        state.api.faults.delay_request().await;
        let response = match handle(&state, request).await {
            Ok(response) => response,
            Err(error) => {
                tracing::debug!(code = error.code, reason = error.reason, message = %error.message, "request failed");
                error_response(&error)
            }
        };
        Ok(response)
    }
    .instrument(span)
    .await
}

async fn handle(
    state: &Arc<HttpState>,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    if authenticate(state, &request).is_none() {
        return Err(ApiError::unauthorized());
    }
    let api = &state.api;
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query = parse_query(request.uri().query());
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    let body = request
        .into_body()
        .collect()
        .await
        .map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?
        .to_bytes();
    let dry_run = query.get("dryRun").is_some_and(|v| v == "All");
    let ok = |value: &Value| Ok(json_response(StatusCode::OK, value));
    match (route(api, &path)?, &method) {
        (Route::Version, &Method::GET) => ok(&discovery::version()),
        (Route::CoreVersions, &Method::GET) => ok(&discovery::core_versions(&state.server_address)),
        (Route::Groups, &Method::GET) => ok(&discovery::group_list(&api.registry)),
        (Route::Group(g), &Method::GET) => {
            ok(&discovery::group(&api.registry, &g)
                .ok_or_else(|| ApiError::path_not_found(&path))?)
        }
        (Route::Resources(g, v), &Method::GET) => {
            ok(&discovery::resource_list(&api.registry, &g, &v)
                .ok_or_else(|| ApiError::path_not_found(&path))?)
        }
        (Route::Collection { res, namespace }, &Method::GET) if truthy(&query, "watch") => {
            api.count("watch", res, false);
            let timeout = query
                .get("timeoutSeconds")
                .and_then(|t| t.parse::<u64>().ok())
                .map_or(Duration::from_secs(1800), Duration::from_secs);
            let receiver = watch::start(
                api.clone(),
                WatchRequest {
                    res,
                    namespace,
                    selectors: selectors(&query)?,
                    resource_version: query.get("resourceVersion").cloned(),
                    bookmarks: truthy(&query, "allowWatchBookmarks"),
                    send_initial_events: truthy(&query, "sendInitialEvents"),
                    timeout,
                },
                state.bookmark_interval,
            )?;
            let stream = futures::stream::unfold(receiver, |mut rx| async move {
                rx.recv()
                    .await
                    .map(|bytes| (Ok::<_, Infallible>(Frame::data(bytes)), rx))
            });
            let mut response = Response::new(http_body_util::BodyExt::boxed_unsync(
                StreamBody::new(stream.boxed()),
            ));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            Ok(response)
        }
        (Route::Collection { res, namespace }, &Method::GET) => {
            api.count("list", res, false);
            let page = api.list(
                res,
                namespace.as_deref(),
                &ListQuery {
                    selectors: selectors(&query)?,
                    limit: query.get("limit").and_then(|l| l.parse().ok()),
                    continue_token: query.get("continue").filter(|c| !c.is_empty()).cloned(),
                    resource_version: query.get("resourceVersion").cloned(),
                    resource_version_match: query.get("resourceVersionMatch").cloned(),
                },
            )?;
            let rt = api.registry.get(res);
            #[derive(Serialize)]
            #[serde(rename_all = "camelCase")]
            struct ListMeta {
                resource_version: String,
                #[serde(rename = "continue", skip_serializing_if = "Option::is_none")]
                continue_token: Option<String>,
                #[serde(skip_serializing_if = "Option::is_none")]
                remaining_item_count: Option<u64>,
            }
            #[derive(Serialize)]
            #[serde(rename_all = "camelCase")]
            struct List<'a> {
                api_version: String,
                kind: String,
                metadata: ListMeta,
                items: Vec<&'a Value>,
            }
            Ok(json_response(
                StatusCode::OK,
                &List {
                    api_version: rt.api_version(),
                    kind: format!("{}List", rt.kind),
                    metadata: ListMeta {
                        resource_version: page.resource_version.to_string(),
                        continue_token: page.continue_token,
                        remaining_item_count: page.remaining,
                    },
                    items: page.items.iter().map(|i| &**i).collect(),
                },
            ))
        }
        (Route::Collection { res, namespace }, &Method::POST) => {
            api.count("create", res, false);
            let created = api.create(res, namespace.as_deref(), parse_body(&body)?, dry_run)?;
            Ok(json_response(StatusCode::CREATED, &*created))
        }
        (Route::Collection { res, namespace }, &Method::DELETE) => {
            api.count("deletecollection", res, false);
            let options = delete_options(&query, &body)?;
            let deleted =
                api.delete_collection(res, namespace.as_deref(), &selectors(&query)?, &options)?;
            let rt = api.registry.get(res);
            let items: Vec<&Value> = deleted.iter().map(|d| &**d).collect();
            ok(
                &serde_json::json!({"apiVersion": rt.api_version(), "kind": format!("{}List", rt.kind), "metadata": {}, "items": items}),
            )
        }
        (Route::Object(target), &Method::GET) => {
            api.count("get", target.res, target.status);
            ok(&*api.get(&target)?)
        }
        (Route::Object(target), &Method::PUT) => {
            api.count("update", target.res, target.status);
            ok(&*api.update(&target, parse_body(&body)?, dry_run)?)
        }
        (Route::Object(target), &Method::PATCH) => {
            api.count("patch", target.res, target.status);
            let patch = match content_type.as_str() {
                "application/json-patch+json" => PatchBody::Json(parse_body(&body)?),
                "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                    PatchBody::Merge(parse_body(&body)?)
                }
                "application/apply-patch+yaml" | "application/apply-patch+json" => {
                    let config = serde_json::from_slice(&body)
                        .or_else(|_| serde_yaml::from_slice(&body))
                        .map_err(|e| ApiError::bad_request(format!("invalid apply body: {e}")))?;
                    let manager = query
                        .get("fieldManager")
                        .filter(|m| !m.is_empty())
                        .cloned()
                        .ok_or_else(|| {
                            ApiError::bad_request("PATCH with apply requires fieldManager")
                        })?;
                    PatchBody::Apply {
                        config,
                        manager,
                        force: truthy(&query, "force"),
                    }
                }
                other => return Err(ApiError::unsupported_media_type(other)),
            };
            let (object, created) = api.patch(&target, patch, dry_run)?;
            Ok(json_response(
                if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                },
                &*object,
            ))
        }
        (Route::Object(target), &Method::DELETE) => {
            api.count("delete", target.res, false);
            let options = delete_options(&query, &body)?;
            ok(&*api.delete(&target, &options, dry_run)?)
        }
        (_, method) => Err(ApiError::method_not_allowed(method.as_str())),
    }
}

fn delete_options(query: &HashMap<String, String>, body: &[u8]) -> Result<DeleteOptions, ApiError> {
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        parse_body(body)?
    };
    let policy = query.get("propagationPolicy").cloned().or_else(|| {
        body.get("propagationPolicy")
            .and_then(Value::as_str)
            .map(str::to_string)
    });
    let propagation = match policy.as_deref() {
        None | Some("Background") => Propagation::Background,
        Some("Foreground") => Propagation::Foreground,
        Some("Orphan") => Propagation::Orphan,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown propagationPolicy {other:?}"
            )));
        }
    };
    let precondition = |f: &str| {
        body.pointer(&format!("/preconditions/{f}"))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    Ok(DeleteOptions {
        propagation,
        uid: precondition("uid"),
        resource_version: precondition("resourceVersion"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_percent_decoded() {
        let q = parse_query(Some("labelSelector=app%3Dweb%2Ctier+in+%28a%29&watch=1&x"));
        assert_eq!(q["labelSelector"], "app=web,tier in (a)");
        assert_eq!(q["watch"], "1");
        assert_eq!(q["x"], "");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
