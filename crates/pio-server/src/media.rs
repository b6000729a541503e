//! Images of chat requests: `data:` URLs decoded in place, `file://` URLs read only from under
//! the directory the operator allows, and nothing fetched over the network.

use std::path::Path;
use std::sync::Arc;

use pio_model::image::{data_url_bytes, decode, preprocess, PixelValues};

use crate::error::ApiError;
use crate::AppState;

/// Largest image file read from a `file://` URL.
const MAX_FILE_BYTES: u64 = 64 << 20;

fn bad(message: String) -> ApiError {
    ApiError::bad_param("messages", message)
}

/// The image at `url` laid out for the model's vision tower.
pub(crate) fn load_image(s: &AppState, url: &str) -> Result<Arc<PixelValues>, ApiError> {
    let Some(vision) = &s.vision else {
        return Err(bad("this model takes no images".into()));
    };
    let bytes = if url.starts_with("data:") {
        data_url_bytes(url).map_err(|e| bad(e.to_string()))?
    } else if let Some(path) = url.strip_prefix("file://") {
        read_local(vision.allowed_local_media_path.as_deref(), Path::new(path))?
    } else if url.starts_with("http://") || url.starts_with("https://") {
        return Err(bad("image URLs are not fetched over the network: send the image inline as a data: URL \
             (data:image/png;base64,...)"
            .into()));
    } else {
        let scheme = url.split(':').next().unwrap_or_default();
        return Err(bad(format!("image URLs of scheme {scheme:?} are not supported (data: or file://)")));
    };
    let img = decode(&bytes).map_err(|e| bad(e.to_string()))?;
    let pixels = preprocess(&img, &vision.processor).map_err(|e| bad(e.to_string()))?;
    let tokens = pixels.num_tokens(vision.processor.merge_size);
    if tokens > vision.max_image_tokens {
        return Err(bad(format!(
            "a {} x {} image takes {tokens} tokens, more than this server's --max-image-tokens {}: send a smaller image",
            img.width, img.height, vision.max_image_tokens
        )));
    }
    Ok(Arc::new(pixels))
}

/// The bytes of `path` if it lies under `allowed` (links resolved first).
fn read_local(allowed: Option<&Path>, path: &Path) -> Result<Vec<u8>, ApiError> {
    let Some(allowed) = allowed else {
        return Err(bad("file:// image URLs need the server to be started with --allowed-local-media-path".into()));
    };
    let outside = || bad(format!("file://{} is not under the allowed media directory", path.display()));
    let real = path.canonicalize().map_err(|_| outside())?;
    let root = allowed.canonicalize().map_err(|_| outside())?;
    if !real.starts_with(&root) || !real.is_file() {
        return Err(outside());
    }
    let len = std::fs::metadata(&real).map_err(|_| outside())?.len();
    if len > MAX_FILE_BYTES {
        return Err(bad(format!("the image file has {len} bytes, more than the {MAX_FILE_BYTES} read")));
    }
    std::fs::read(&real).map_err(|_| outside())
}
