//! The records checked before step 1: each image file's header is read (format and
//! dimensions, no pixels) and each prompt's length computed from it, so that a missing or
//! unreadable image, one the processor would refuse, or a prompt longer than the model's
//! positions is found at the start, naming its record and file, not hours into the run.

use std::path::Path;

use medvqa::load::Skipped;
use medvqa::{PromptTemplate, VqaRecord};
use qwen2vl::processor::{render_chat, smart_resize, Message, Processor};

use crate::progress::Progress;

/// What a prompt must fit: the model's positions, less the tokens its completion may take.
pub struct Fit<'a> {
    pub processor: &'a Processor,
    pub template: &'a PromptTemplate,
    pub positions: usize,
    /// New tokens the prompt must leave room for.
    pub reserve: usize,
}

/// A cut-short JPEG or PNG decodes without an error (the missing rows come out grey), so the
/// file's end is checked: a JPEG's end-of-image marker or a PNG's IEND chunk must be within its
/// last 4 KiB (some writers pad after them).
fn ends_whole(path: &Path, format: image::ImageFormat) -> Result<(), String> {
    use std::io::{Read, Seek, SeekFrom};
    let marker: &[u8] = match format {
        image::ImageFormat::Jpeg => &[0xff, 0xd9],
        image::ImageFormat::Png => b"IEND",
        _ => return Ok(()),
    };
    let io = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(4096)))
        .map_err(io)?;
    let mut tail = Vec::with_capacity(4096);
    f.read_to_end(&mut tail).map_err(io)?;
    if tail.windows(marker.len()).any(|w| w == marker) {
        Ok(())
    } else {
        Err(format!(
            "{}: the {format:?} file is cut short (no end marker; {len} bytes): re-copy or \
             re-download it",
            path.display()
        ))
    }
}

/// Why `record` cannot be used, if it cannot: its image, or a prompt too long for the model.
fn check(
    record: &VqaRecord,
    root: &Path,
    resize: Option<(usize, usize)>,
    fit: &Fit<'_>,
) -> Result<(), String> {
    let image = &fit.processor.image;
    let path = root.join(&record.image);
    let reader = image::ImageReader::open(&path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let Some(format) = reader.format() else {
        return Err(format!(
            "{}: not an image format medr1 reads (PNG, JPEG)",
            path.display()
        ));
    };
    ends_whole(&path, format)?;
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| format!("{}: cannot read the image header: {e}", path.display()))?;
    let (w, h) = resize.unwrap_or((w as usize, h as usize));
    let (rh, rw) = smart_resize(
        h,
        w,
        image.patch_size * image.merge_size,
        image.min_pixels,
        image.max_pixels,
    )
    .map_err(|e| format!("{}: {w}x{h}: {e}", path.display()))?;
    let merge = image.merge_size * image.merge_size;
    let image_tokens = (rh / image.patch_size) * (rw / image.patch_size) / merge.max(1);
    let text = fit.template.render(&record.problem());
    let chat = render_chat(&[Message::user_with_image(text)], true, false);
    let tokens = fit
        .processor
        .expand_ids(&chat, &[image_tokens])
        .map_err(|e| e.to_string())?
        .len();
    if tokens + fit.reserve > fit.positions {
        return Err(format!(
            "the prompt is {tokens} tokens ({image_tokens} of them the image) and its \
             completion may take {} more: over the model's {} positions",
            fit.reserve, fit.positions
        ));
    }
    Ok(())
}

/// Checks every record's image; with `skip_invalid` the bad ones are left out and returned,
/// otherwise the first is the error.
#[allow(clippy::too_many_arguments)]
pub fn scan(
    records: Vec<VqaRecord>,
    what: &str,
    root: &Path,
    resize: Option<(usize, usize)>,
    fit: &Fit<'_>,
    skip_invalid: bool,
    should_stop: &dyn Fn() -> bool,
) -> anyhow::Result<(Vec<VqaRecord>, Vec<Skipped>)> {
    let mut progress = Progress::new(&format!("checking {what} images"), records.len());
    let real_root = std::fs::canonicalize(root).ok();
    let (mut outside, mut outside_count) = (None::<std::path::PathBuf>, 0usize);
    let mut kept = Vec::with_capacity(records.len());
    let mut skipped = Vec::new();
    for (i, r) in records.into_iter().enumerate() {
        // The record's path stays under the root (checked when it was read); a symbolic link
        // may still lead out of it (data on another disk, or a mistake): counted and said.
        if let (Some(real_root), Ok(real)) =
            (&real_root, std::fs::canonicalize(root.join(&r.image)))
        {
            if !real.starts_with(real_root) {
                outside.get_or_insert_with(|| real.clone());
                outside_count += 1;
            }
        }
        match check(&r, root, resize, fit) {
            Ok(()) => kept.push(r),
            Err(reason) if skip_invalid => skipped.push(Skipped {
                file: root.join(&r.image),
                index: i,
                reason: format!("record {}: {reason}", r.id),
            }),
            Err(reason) => anyhow::bail!(
                "{what} record {} (image {}): {reason}\n(data.skip_invalid = true leaves such \
                 records out and lists them)",
                r.id,
                r.image
            ),
        }
        if i % 64 == 63 {
            progress.set(i + 1);
            if should_stop() {
                anyhow::bail!("interrupted while checking the {what} images");
            }
        }
    }
    progress.set(kept.len() + skipped.len());
    progress.finish();
    if let Some(first) = outside {
        eprintln!(
            "note: {outside_count} {what} image(s) lead out of the data root {} through \
             symbolic links (the first to {})",
            root.display(),
            first.display()
        );
    }
    Ok((kept, skipped))
}
