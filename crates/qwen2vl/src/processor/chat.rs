//! The Qwen2-VL-Instruct chat template, rendered exactly as its Jinja source does
//! (`shared/reference/chat_template_qwen2vl.jinja`): a default system turn when the first
//! message is not one, `<|vision_start|><|image_pad|><|vision_end|>` per image, text items
//! joined with no separator, and `<|im_start|>assistant\n` as the generation prompt.

/// One item of a message's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentItem {
    Image,
    Video,
    Text(String),
}

/// A message's content: a plain string or a list of items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Text(String),
    Items(Vec<ContentItem>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: Content,
}

impl Message {
    /// The user turn Med-R1 sends: one image, then the prompt text.
    pub fn user_with_image(text: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: Content::Items(vec![ContentItem::Image, ContentItem::Text(text.into())]),
        }
    }
}

pub const DEFAULT_SYSTEM: &str = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n";

/// Renders `messages` with the template. `add_vision_id` prefixes `Picture k: ` to images.
pub fn render_chat(
    messages: &[Message],
    add_generation_prompt: bool,
    add_vision_id: bool,
) -> String {
    let mut out = String::new();
    let (mut images, mut videos) = (0, 0);
    for (i, m) in messages.iter().enumerate() {
        if i == 0 && m.role != "system" {
            out.push_str(DEFAULT_SYSTEM);
        }
        out.push_str("<|im_start|>");
        out.push_str(&m.role);
        out.push('\n');
        match &m.content {
            Content::Text(t) => out.push_str(t),
            Content::Items(items) => {
                for item in items {
                    match item {
                        ContentItem::Image => {
                            images += 1;
                            if add_vision_id {
                                out.push_str(&format!("Picture {images}: "));
                            }
                            out.push_str("<|vision_start|><|image_pad|><|vision_end|>");
                        }
                        ContentItem::Video => {
                            videos += 1;
                            if add_vision_id {
                                out.push_str(&format!("Video {videos}: "));
                            }
                            out.push_str("<|vision_start|><|video_pad|><|vision_end|>");
                        }
                        ContentItem::Text(t) => out.push_str(t),
                    }
                }
            }
        }
        out.push_str("<|im_end|>\n");
    }
    if add_generation_prompt {
        out.push_str("<|im_start|>assistant\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn med_r1_turn_gets_the_default_system_prompt() {
        let s = render_chat(
            &[Message::user_with_image("Describe this image.")],
            true,
            false,
        );
        assert_eq!(
            s,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\
             <|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn an_explicit_system_turn_replaces_the_default() {
        let msgs = [
            Message {
                role: "system".into(),
                content: Content::Text("Be brief.".into()),
            },
            Message {
                role: "user".into(),
                content: Content::Items(vec![
                    ContentItem::Image,
                    ContentItem::Image,
                    ContentItem::Text("Compare.".into()),
                ]),
            },
        ];
        let s = render_chat(&msgs, false, true);
        assert_eq!(
            s,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>\
             Picture 2: <|vision_start|><|image_pad|><|vision_end|>Compare.<|im_end|>\n"
        );
    }
}
