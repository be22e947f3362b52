//! The HTTP side of `mcld serve` (axum): the embedded page, the pose gallery, job submission
//! (multipart uploads, decoded and checked before anything is queued), Server-Sent Events of a
//! job's progress, cancel, and the result images. Every refusal is a JSON `{"error": ...}` with
//! a 4xx status; nothing a request sends can stop the server.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Multipart, Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::set_header::SetResponseHeaderLayer;

use super::engine::{Embedding, GarmentDonor, JobRequest, PoseInput, Upload};
use super::jobs::{CancelOutcome, Job};
use super::Shared;
use crate::edit::compose::Region;
use crate::pipeline::mcld::SampleOptions;

const INDEX_HTML: &str = include_str!("static/index.html");
const APP_JS: &str = include_str!("static/app.js");
const STYLE_CSS: &str = include_str!("static/style.css");
const FAVICON_SVG: &str = include_str!("static/favicon.svg");

/// Largest decoded upload, in pixels: a small file can declare a huge image.
const MAX_PIXELS: u64 = 40_000_000;
/// Most DDIM steps a request may ask for (the schedule has 1000 training timesteps).
const MAX_STEPS: usize = 1000;

/// A refused request: status and a message for the page.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn bad(msg: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, msg.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

type Shr = State<Arc<Shared>>;

pub fn router(shared: Arc<Shared>) -> Router {
    let limit = shared.max_upload;
    Router::new()
        .route(
            "/",
            get(|| async { page(INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/app.js",
            get(|| async { page(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/style.css",
            get(|| async { page(STYLE_CSS, "text/css; charset=utf-8") }),
        )
        .route(
            "/favicon.svg",
            get(|| async { page(FAVICON_SVG, "image/svg+xml") }),
        )
        .route("/api/status", get(status))
        .route("/api/poses", get(list_poses))
        .route("/api/poses/{name}", get(pose_preview))
        .route("/api/jobs", post(submit))
        .route("/api/jobs/{id}", get(job_state))
        .route("/api/jobs/{id}/events", get(job_events))
        .route("/api/jobs/{id}/cancel", post(cancel))
        .route("/api/jobs/{id}/{file}", get(job_file))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such page".into()) })
        .layer(DefaultBodyLimit::max(limit))
        .layer(RequestBodyLimitLayer::new(limit))
        .layer(middleware::from_fn_with_state(shared.clone(), guard))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; \
                 style-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; \
                 frame-ancestors 'none'",
            ),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ))
        .with_state(shared)
}

fn page(body: &'static str, kind: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind)], body).into_response()
}

/// Refuses requests addressed to a host name other than the loopback one the server listens
/// on (a web page elsewhere cannot reach it by DNS rebinding), and state-changing requests
/// from another origin (a page elsewhere cannot queue jobs here).
async fn guard(State(s): Shr, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();
    if let Some(allowed) = &s.allowed_hosts {
        if !allowed.iter().any(|a| a.eq_ignore_ascii_case(&host)) {
            return ApiError(
                StatusCode::FORBIDDEN,
                format!("host {host:?} refused: this server answers on its loopback address"),
            )
            .into_response();
        }
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("");
            let same = origin
                .strip_prefix("http://")
                .is_some_and(|o| o.eq_ignore_ascii_case(&host));
            if !same {
                return ApiError(
                    StatusCode::FORBIDDEN,
                    format!("cross-origin request from {origin:?} refused"),
                )
                .into_response();
            }
        }
    }
    next.run(req).await
}

async fn status(State(s): Shr) -> Json<serde_json::Value> {
    let (waiting, running) = s.queue.counts();
    let model = s.model.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Json(json!({
        "model": model,
        "device": s.device,
        "dtype": s.dtype,
        "queue": { "waiting": waiting, "running": running, "max_waiting": s.queue.max_waiting },
        "max_upload_bytes": s.max_upload,
        "gallery": s.gallery.as_ref().map(|g| g.len()),
        "regions": Region::ALL.iter().map(|r| r.name()).collect::<Vec<_>>(),
        "network_loads": s.loads.load(Ordering::Relaxed),
        "generations": s.generations.load(Ordering::Relaxed),
        "uptime_seconds": s.started.elapsed().as_secs_f64(),
        "rss_mib": super::rss_mib(),
    }))
}

#[derive(Deserialize)]
struct PoseQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    offset: usize,
    limit: Option<usize>,
}

async fn list_poses(
    State(s): Shr,
    Query(q): Query<PoseQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let g = s.gallery.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "no pose gallery: start the server with --poses DIR".into(),
        )
    })?;
    let (total, names) = g.list(&q.q, q.offset, q.limit.unwrap_or(60).min(500));
    Ok(Json(json!({ "total": total, "names": names })))
}

/// Runs blocking work (decoding, encoding) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|_| {
        Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error".into(),
        ))
    })
}

fn png_response(bytes: Vec<u8>, cache: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, "image/png"),
            (header::CACHE_CONTROL, cache),
        ],
        bytes,
    )
        .into_response()
}

/// A gallery pose as a coloured preview, 192 pixels high.
async fn pose_preview(State(s): Shr, UrlPath(name): UrlPath<String>) -> Result<Response, ApiError> {
    let path = resolve_pose(&s, &name)?;
    let png = blocking(move || {
        let iuv = crate::data::read_rgb(&path).map_err(|e| ApiError::bad(e.to_string()))?;
        let prev = crate::imageops::viz::pose_preview(&iuv);
        let h = 192u32;
        let w =
            ((prev.width() as f64 * h as f64 / prev.height().max(1) as f64).round() as u32).max(1);
        let small = image::imageops::resize(&prev, w, h, image::imageops::FilterType::Triangle);
        crate::fsutil::encode_image(
            &image::DynamicImage::ImageRgb8(small),
            image::ImageFormat::Png,
            Path::new("preview.png"),
        )
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
    })
    .await?;
    Ok(png_response(png, "max-age=3600"))
}

fn resolve_pose(s: &Shared, name: &str) -> Result<std::path::PathBuf, ApiError> {
    let g = s
        .gallery
        .as_ref()
        .ok_or_else(|| ApiError::bad("no pose gallery: start the server with --poses DIR"))?;
    g.resolve(name).map_err(|e| {
        let status = match e {
            super::gallery::GalleryError::NotFound => StatusCode::NOT_FOUND,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError(status, e.message(name))
    })
}

/// A file name from the browser, reduced to something safe to show and to put in a command
/// line: its last path component, printable characters only, at most 100 of them. It is
/// never used to open or write a file.
pub fn clean_name(raw: Option<&str>, fallback: &str) -> String {
    let raw = raw.unwrap_or("");
    let last = raw.rsplit(['/', '\\']).next().unwrap_or("");
    let cleaned: String = last.chars().filter(|c| !c.is_control()).take(100).collect();
    let cleaned = cleaned.trim();
    if cleaned.is_empty() || cleaned == "." || cleaned == ".." {
        fallback.to_string()
    } else {
        cleaned.to_string()
    }
}

/// One multipart field as received.
struct Part {
    file_name: Option<String>,
    bytes: Bytes,
}

fn multipart_error(e: axum::extract::multipart::MultipartError, limit: usize) -> ApiError {
    // An upload streamed without a length trips the limit while the body is read; the error
    // then comes wrapped more deeply than axum's own check looks.
    let mut over = e.status() == StatusCode::PAYLOAD_TOO_LARGE;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = source {
        over |= err.is::<http_body_util::LengthLimitError>();
        source = err.source();
    }
    if over {
        let status = StatusCode::PAYLOAD_TOO_LARGE;
        ApiError(
            status,
            format!(
                "upload too large: at most {} MB per generation (--max-upload-mb)",
                limit / (1024 * 1024)
            ),
        )
    } else {
        ApiError(e.status(), format!("bad upload: {}", e.body_text()))
    }
}

/// Decodes an uploaded image (as `mcld infer` reads a file), refusing huge dimensions first.
fn decode_upload(field: &str, part: &Part) -> Result<Upload, ApiError> {
    let name = clean_name(part.file_name.as_deref(), field);
    if part.bytes.is_empty() {
        return Err(ApiError::bad(format!(
            "{field} ({name}): the file is empty"
        )));
    }
    let dims = image::ImageReader::new(std::io::Cursor::new(&part.bytes[..]))
        .with_guessed_format()
        .ok()
        .and_then(|r| r.into_dimensions().ok());
    if let Some((w, h)) = dims {
        if w as u64 * h as u64 > MAX_PIXELS {
            return Err(ApiError::bad(format!(
                "{field} ({name}): {w}x{h} is too large (at most {} megapixels)",
                MAX_PIXELS / 1_000_000
            )));
        }
    }
    let img = crate::imageops::decode_image(&part.bytes, Path::new(&name))
        .map_err(|e| ApiError::bad(format!("{field}: {e}")))?;
    Ok(Upload {
        name,
        image: img.to_rgb8(),
        digest: format!("{:x}", Sha256::digest(&part.bytes)),
    })
}

fn decode_embedding(field: &str, part: &Part) -> Result<Embedding, ApiError> {
    let name = clean_name(part.file_name.as_deref(), field);
    let values = crate::data::parse_face_embedding(&part.bytes, Path::new(&name))
        .map_err(|e| ApiError::bad(format!("{field}: {e}")))?;
    Ok(Embedding { name, values })
}

/// DensePose IUV images have part indices 0..=24 in blue: anything else is a photo or a
/// texture map given as a pose by mistake.
fn check_iuv(what: &str, img: &image::RgbImage) -> Result<(), ApiError> {
    let max = img.pixels().map(|p| p[2]).max().unwrap_or(0);
    if max > 24 {
        return Err(ApiError::bad(format!(
            "{what} is not a DensePose IUV image: its blue channel (the part index) reaches \
             {max}, and parts go up to 24; upload a photo of the pose under \"pose photo\" \
             instead"
        )));
    }
    if max == 0 {
        return Err(ApiError::bad(format!(
            "{what} is not a DensePose IUV image: it has no body part (blue channel all zero)"
        )));
    }
    Ok(())
}

fn text(field: &str, part: &Part) -> Result<String, ApiError> {
    String::from_utf8(part.bytes.to_vec())
        .map(|s| s.trim().to_string())
        .map_err(|_| ApiError::bad(format!("{field}: not text")))
}

/// The fields of a generation form, turned into a request (all decoding happens here, so a
/// bad file is refused before the job is queued).
fn build_request(s: &Shared, mut parts: HashMap<String, Part>) -> Result<JobRequest, ApiError> {
    let mut take = |k: &str| parts.remove(k);
    let source = take("source")
        .ok_or_else(|| ApiError::bad("no source photo (field \"source\")"))
        .and_then(|p| decode_upload("source", &p))?;

    let pose_name = take("pose");
    let pose_iuv = take("pose_iuv");
    let pose_photo = take("pose_photo");
    let pose = match (pose_name, pose_iuv, pose_photo) {
        (Some(n), None, None) => {
            let name = text("pose", &n)?;
            let path = resolve_pose(s, &name)?;
            let image = crate::data::read_rgb(&path).map_err(|e| ApiError::bad(e.to_string()))?;
            check_iuv(&format!("gallery pose {name}"), &image)?;
            PoseInput::Gallery { name, path, image }
        }
        (None, Some(p), None) => {
            let u = decode_upload("pose_iuv", &p)?;
            check_iuv(&format!("pose image {}", u.name), &u.image)?;
            PoseInput::Iuv(u)
        }
        (None, None, Some(p)) => PoseInput::Photo(decode_upload("pose_photo", &p)?),
        (None, None, None) => {
            return Err(ApiError::bad(
                "no target pose: pick one from the gallery (\"pose\"), or upload an IUV image \
                 (\"pose_iuv\") or a photo of the pose (\"pose_photo\")",
            ))
        }
        _ => return Err(ApiError::bad("give one target pose, not several")),
    };
    let texture = take("texture")
        .map(|p| decode_upload("texture", &p))
        .transpose()?;
    let face = take("face")
        .map(|p| decode_embedding("face", &p))
        .transpose()?;
    let face_from = take("face_from")
        .map(|p| decode_upload("face_from", &p))
        .transpose()?;
    let face_emb = take("face_emb")
        .map(|p| decode_embedding("face_emb", &p))
        .transpose()?;
    if face_from.is_some() && face_emb.is_some() {
        return Err(ApiError::bad(
            "give the identity donor as a photo or as an embedding, not both",
        ));
    }
    if face.is_some() && (face_from.is_some() || face_emb.is_some()) {
        return Err(ApiError::bad(
            "the source's face embedding and an identity donor exclude each other: the donor's \
             identity replaces the source's",
        ));
    }
    let mut garments = Vec::new();
    for region in Region::ALL {
        let photo = take(&format!("garment_{}", region.name()));
        let tex = take(&format!("garment_texture_{}", region.name()));
        match (photo, tex) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad(format!(
                    "region {region}: give a donor photo or a donor texture map, not both"
                )))
            }
            (Some(p), None) => garments.push((
                region,
                GarmentDonor::Photo(decode_upload(&format!("garment_{region}"), &p)?),
            )),
            (None, Some(p)) => garments.push((
                region,
                GarmentDonor::Texture(decode_upload(&format!("garment_texture_{region}"), &p)?),
            )),
            (None, None) => {}
        }
    }
    let seed = match take("seed") {
        Some(p) => {
            let t = text("seed", &p)?;
            t.parse::<u64>()
                .map_err(|_| ApiError::bad(format!("seed {t:?}: expected a whole number from 0")))?
        }
        None => 42,
    };
    let steps = match take("steps") {
        Some(p) => {
            let t = text("steps", &p)?;
            match t.parse::<usize>() {
                Ok(n) if (1..=MAX_STEPS).contains(&n) => Some(n),
                _ => {
                    return Err(ApiError::bad(format!(
                        "steps {t:?}: expected a whole number from 1 to {MAX_STEPS}"
                    )))
                }
            }
        }
        None => None,
    };
    let guidance = match take("guidance") {
        Some(p) => {
            let t = text("guidance", &p)?;
            match t.parse::<f64>() {
                Ok(g) if g.is_finite() && (0.0..=50.0).contains(&g) => Some(g),
                _ => {
                    return Err(ApiError::bad(format!(
                        "guidance {t:?}: expected a number from 0 to 50"
                    )))
                }
            }
        }
        None => None,
    };
    if let Some(k) = parts.keys().next() {
        return Err(ApiError::bad(format!("unknown form field {k:?}")));
    }
    Ok(JobRequest {
        source,
        pose,
        texture,
        face,
        face_from,
        face_emb,
        garments,
        seed,
        options: SampleOptions { steps, guidance },
    })
}

async fn submit(State(s): Shr, mut mp: Multipart) -> Result<Response, ApiError> {
    if let super::ModelState::Failed { message } =
        &*s.model.lock().unwrap_or_else(|p| p.into_inner())
    {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the networks failed to load: {message}"),
        ));
    }
    let mut parts: HashMap<String, Part> = HashMap::new();
    while let Some(field) = mp
        .next_field()
        .await
        .map_err(|e| multipart_error(e, s.max_upload))?
    {
        let name = field.name().unwrap_or("").to_string();
        let file_name = field.file_name().map(str::to_string);
        let bytes = field
            .bytes()
            .await
            .map_err(|e| multipart_error(e, s.max_upload))?;
        // An empty file input (nothing chosen) is no field at all.
        if file_name.as_deref() == Some("") && bytes.is_empty() {
            continue;
        }
        if parts.contains_key(&name) {
            return Err(ApiError::bad(format!("form field {name:?} given twice")));
        }
        parts.insert(name, Part { file_name, bytes });
    }
    let shared = s.clone();
    let request = blocking(move || build_request(&shared, parts)).await?;
    let job = s.queue.submit(request).map_err(|full| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the queue is full ({} jobs waiting): try again when one has started",
                full.0
            ),
        )
    })?;
    let position = match job.last_event() {
        Some(super::jobs::Event::Queued { position }) => position,
        _ => 0,
    };
    let body = json!({
        "id": job.id,
        "position": position,
        "events": format!("/api/jobs/{}/events", job.id),
    });
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

fn find_job(s: &Shared, id: &str) -> Result<Arc<Job>, ApiError> {
    s.queue.get(id).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no job {id:?} (finished jobs are kept for a while only)"),
        )
    })
}

async fn job_state(State(s): Shr, UrlPath(id): UrlPath<String>) -> Result<Response, ApiError> {
    let job = find_job(&s, &id)?;
    Ok(Json(json!({ "id": job.id, "last": job.last_event() })).into_response())
}

/// Every event of the job from the first, then the new ones as they happen; the stream ends
/// after the last (done, failed or cancelled).
async fn job_events(
    State(s): Shr,
    UrlPath(id): UrlPath<String>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let job = find_job(&s, &id)?;
    let rx = job.subscribe();
    let stream = futures_util::stream::unfold(
        (job, rx, 0usize, false),
        |(job, mut rx, next, over)| async move {
            if over {
                return None;
            }
            loop {
                if let Some(ev) = job.event(next) {
                    let terminal = ev.is_terminal();
                    let sse = SseEvent::default()
                        .json_data(&ev)
                        .unwrap_or_else(|_| SseEvent::default().data("{}"));
                    return Some((Ok(sse), (job, rx, next + 1, terminal)));
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

async fn cancel(State(s): Shr, UrlPath(id): UrlPath<String>) -> Result<Response, ApiError> {
    let (status, what) = match s.queue.cancel(&id) {
        CancelOutcome::Dequeued => (StatusCode::OK, "removed from the queue"),
        CancelOutcome::Requested => (StatusCode::ACCEPTED, "stops at the next step"),
        CancelOutcome::AlreadyFinished => {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("job {id} is already over"),
            ))
        }
        CancelOutcome::NotFound => {
            return Err(ApiError(StatusCode::NOT_FOUND, format!("no job {id:?}")))
        }
    };
    Ok((status, Json(json!({ "id": id, "cancel": what }))).into_response())
}

async fn job_file(
    State(s): Shr,
    UrlPath((id, file)): UrlPath<(String, String)>,
) -> Result<Response, ApiError> {
    let job = find_job(&s, &id)?;
    let out = job.output().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("job {id} has no result (yet)"),
        )
    })?;
    let bytes = match file.as_str() {
        "result.png" => out.result_png.clone(),
        "pose.png" => out.pose_preview_png.clone(),
        "pose_iuv.png" => out.pose_iuv_png.clone(),
        _ => return Err(ApiError(StatusCode::NOT_FOUND, format!("no file {file:?}"))),
    };
    Ok(png_response(bytes, "private, max-age=3600"))
}

#[cfg(test)]
mod tests {
    use super::clean_name;

    #[test]
    fn uploaded_names_lose_their_folders() {
        assert_eq!(clean_name(Some("../../etc/passwd"), "f"), "passwd");
        assert_eq!(clean_name(Some("C:\\Users\\x\\me.jpg"), "f"), "me.jpg");
        assert_eq!(clean_name(Some(".."), "f"), "f");
        assert_eq!(clean_name(None, "source"), "source");
        assert_eq!(clean_name(Some("a\nb.png"), "f"), "ab.png");
    }
}
