//! Text <-> ids with the checkpoint's own `tokenizer.json` (byte-level BPE, NFC, special
//! tokens matched whole), through the `tokenizers` crate.

use std::path::Path;

use tokenizers::Tokenizer;

use super::ProcessorError;

pub struct TextTokenizer {
    inner: Tokenizer,
    source: String,
}

impl TextTokenizer {
    pub fn from_file(path: &Path) -> Result<Self, ProcessorError> {
        if !path.is_file() {
            return Err(ProcessorError::Io(
                path.to_path_buf(),
                std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer.json not found"),
            ));
        }
        let inner = Tokenizer::from_file(path)
            .map_err(|e| ProcessorError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self {
            inner,
            source: path.display().to_string(),
        })
    }

    pub fn from_bytes(bytes: &[u8], source: &str) -> Result<Self, ProcessorError> {
        let inner = Tokenizer::from_bytes(bytes)
            .map_err(|e| ProcessorError::Tokenizer(format!("{source}: {e}")))?;
        Ok(Self {
            inner,
            source: source.to_string(),
        })
    }

    /// Ids of `text` without added BOS/EOS (`add_special_tokens=False`, as Med-R1 calls it).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ProcessorError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| ProcessorError::Tokenizer(format!("{}: {e}", self.source)))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, ProcessorError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| ProcessorError::Tokenizer(format!("{}: {e}", self.source)))
    }

    /// The id of a token written as text (e.g. `<|image_pad|>`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
