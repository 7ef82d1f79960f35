//! A byte-level tokenizer for tiny models: token id = UTF-8 byte value (0..255), then the
//! Qwen2-VL special tokens in their real order from id 256 (`<|endoftext|>` 256 ...
//! `<|image_pad|>` 268, `<|video_pad|>` 269), as the reference fixtures number them, then the
//! answer-format tags `<think>` 270, `</think>` 271, `<answer>` 272, `</answer>` 273 as single
//! ordinary (non-special) tokens, so that a tiny model's `<answer> B </answer><|im_end|>` is 6
//! tokens rather than 21 (rollouts 3x shorter; the loss is not spread over 20 fixed bytes of
//! markup). Decoding gives back the same text, so rewards see exactly what they would with
//! bytes. Written as
//! a standard `tokenizer.json` (byte-level BPE without merges), so every tool that reads
//! Qwen's tokenizer reads it too.

use serde_json::{json, Map, Value};

/// The Qwen2 special tokens, in id order from `<|endoftext|>`.
pub const QWEN_SPECIAL_TOKENS: [&str; 14] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
];

/// The answer-format tags, single tokens after the special tokens.
pub const TAG_TOKENS: [&str; 4] = ["<think>", "</think>", "<answer>", "</answer>"];

/// First id of the special tokens in the byte-level vocabulary.
pub const BYTE_SPECIAL_BASE: u32 = 256;

/// GPT-2's reversible byte -> printable character map used by byte-level BPE.
fn byte_to_char() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).expect("valid scalar")
        } else {
            let c = char::from_u32(next).expect("valid scalar");
            next += 1;
            c
        };
    }
    map
}

/// The `tokenizer.json` document.
pub fn byte_tokenizer_json() -> Value {
    let chars = byte_to_char();
    let mut vocab = Map::new();
    for (b, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), json!(b));
    }
    let special = QWEN_SPECIAL_TOKENS.iter().map(|t| (t, true));
    let tags = TAG_TOKENS.iter().map(|t| (t, false));
    let added: Vec<Value> = special
        .chain(tags)
        .enumerate()
        .map(|(k, (t, is_special))| {
            json!({"id": BYTE_SPECIAL_BASE + k as u32, "content": t, "single_word": false,
                   "lstrip": false, "rstrip": false, "normalized": false, "special": is_special})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": []
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processor::TextTokenizer;

    #[test]
    fn ids_are_bytes_and_specials_follow() {
        let json = byte_tokenizer_json().to_string();
        let tk = TextTokenizer::from_bytes(json.as_bytes(), "byte tokenizer").unwrap();
        let text = "<|im_start|>user\nCT é?<|image_pad|><|im_end|>";
        let ids = tk.encode(text).unwrap();
        let mut want = vec![257];
        want.extend("user\nCT é?".bytes().map(u32::from));
        want.extend([268, 258]);
        assert_eq!(ids, want);
        assert_eq!(tk.decode(&ids, false).unwrap(), text);
        assert_eq!(tk.decode(&ids, true).unwrap(), "user\nCT é?");
        assert_eq!(tk.token_id("<|video_pad|>"), Some(269));
        let answer = "<answer> B </answer><|im_end|>";
        let ids = tk.encode(answer).unwrap();
        assert_eq!(ids, vec![272, 32, 66, 32, 273, 258]);
        assert_eq!(tk.decode(&ids, true).unwrap(), "<answer> B </answer>");
        assert_eq!(tk.encode("<think>").unwrap(), vec![270]);
    }
}
