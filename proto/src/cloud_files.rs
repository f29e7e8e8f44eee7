//! A file as cloud-init's `write_files` holds it, shared by the build machines' user data
//! ([`crate::bootstrap`]) and the runner hosts' (the provisioner), and decoded the same way
//! by the sandbox's machine emulator.

use std::io::Read;

use serde::{Deserialize, Serialize};

/// A `write_files` entry whose content cannot be decoded.
#[derive(Debug, thiserror::Error)]
#[error("cloud-init file {0}")]
pub struct FileError(String);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFile {
    pub path: String,
    pub content: String,
    /// Octal mode as cloud-init expects it, e.g. `"0600"`.
    pub permissions: String,
    #[serde(default = "root_owner")]
    pub owner: String,
    /// cloud-init's `encoding` of `content`: unset (plain) or `gz+b64` (what keeps the
    /// journal shipper small enough for EC2's user data limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<String>,
}

impl WriteFile {
    /// The file's bytes as cloud-init writes them (`content` decoded per `encoding`).
    pub fn bytes(&self) -> Result<Vec<u8>, FileError> {
        match self.encoding.as_deref() {
            None | Some("text/plain") => Ok(self.content.clone().into_bytes()),
            Some("b64" | "base64") => b64(&self.content),
            Some("gz+b64" | "gzip+base64" | "gz+base64" | "gzip+b64") => {
                let mut out = Vec::new();
                flate2::read::GzDecoder::new(b64(&self.content)?.as_slice())
                    .read_to_end(&mut out)
                    .map_err(|e| FileError(format!("{}: {e}", self.path)))?;
                Ok(out)
            }
            Some(other) => Err(FileError(format!(
                "{}: unknown encoding {other:?}",
                self.path
            ))),
        }
    }
}

fn b64(text: &str) -> Result<Vec<u8>, FileError> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| FileError(e.to_string()))
}

/// `bytes` gzipped and base64-encoded, for a `gz+b64` file.
pub fn gz_b64(bytes: &[u8]) -> String {
    use base64::Engine;
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(bytes);
    let gz = enc.finish().unwrap_or_default();
    base64::engine::general_purpose::STANDARD.encode(gz)
}

pub(crate) fn root_owner() -> String {
    "root:root".into()
}
