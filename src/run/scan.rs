//! The records' images checked before step 1: each file's header is read (format and
//! dimensions, no pixels), so that a missing or unreadable image, or one the processor would
//! refuse, is found at the start, naming its record and file, not hours into the run.

use std::path::Path;

use medvqa::load::Skipped;
use medvqa::VqaRecord;
use qwen2vl::processor::{smart_resize, ImageProcessorConfig};

use crate::progress::Progress;

/// Why `record`'s image cannot be used, if it cannot.
fn check(
    record: &VqaRecord,
    root: &Path,
    resize: Option<(usize, usize)>,
    image: &ImageProcessorConfig,
) -> Result<(), String> {
    let path = root.join(&record.image);
    let reader = image::ImageReader::open(&path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if reader.format().is_none() {
        return Err(format!(
            "{}: not an image format medr1 reads (PNG, JPEG)",
            path.display()
        ));
    }
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| format!("{}: cannot read the image header: {e}", path.display()))?;
    let (w, h) = resize.unwrap_or((w as usize, h as usize));
    smart_resize(
        h,
        w,
        image.patch_size * image.merge_size,
        image.min_pixels,
        image.max_pixels,
    )
    .map_err(|e| format!("{}: {w}x{h}: {e}", path.display()))?;
    Ok(())
}

/// Checks every record's image; with `skip_invalid` the bad ones are left out and returned,
/// otherwise the first is the error.
pub fn scan(
    records: Vec<VqaRecord>,
    what: &str,
    root: &Path,
    resize: Option<(usize, usize)>,
    image: &ImageProcessorConfig,
    skip_invalid: bool,
) -> anyhow::Result<(Vec<VqaRecord>, Vec<Skipped>)> {
    let mut progress = Progress::new(&format!("checking {what} images"), records.len());
    let mut kept = Vec::with_capacity(records.len());
    let mut skipped = Vec::new();
    for (i, r) in records.into_iter().enumerate() {
        match check(&r, root, resize, image) {
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
        }
    }
    progress.set(kept.len() + skipped.len());
    progress.finish();
    Ok((kept, skipped))
}
