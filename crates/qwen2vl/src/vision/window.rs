//! Qwen2.5-VL's window attention layout: each image frame's merged tokens are tiled by square
//! windows of `win x win` tokens (partial at the right and bottom edges); the tower runs over
//! the patch rows window by window, each window's merge groups row-major inside it, and
//! attends within each window (except in its full-attention blocks).

/// The window order of the patches of images with these grids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowLayout {
    /// Merged-token (merge group) order: position `k` holds group `groups[k]`.
    pub groups: Vec<usize>,
    /// Patch row order: row `r` of the window order is row `rows[r]` of the processor's.
    pub rows: Vec<usize>,
    /// The inverse of `groups`: group `j` sits at position `restore[j]`.
    pub restore: Vec<usize>,
    /// Patches per non-empty window, in order.
    pub segments: Vec<usize>,
}

/// The layout for `grids` (t, h, w in patches), merge size `merge` and windows of `win`
/// merged tokens per side. Windows never cross a frame or an image.
pub fn window_layout(grids: &[[usize; 3]], merge: usize, win: usize) -> WindowLayout {
    let unit = merge * merge;
    let mut groups = Vec::new();
    let mut segments = Vec::new();
    let mut base = 0;
    for &[t, h, w] in grids {
        let (lh, lw) = (h / merge, w / merge);
        for frame in 0..t {
            let first = base + frame * lh * lw;
            for wy in 0..lh.div_ceil(win) {
                for wx in 0..lw.div_ceil(win) {
                    let before = groups.len();
                    for y in wy * win..((wy + 1) * win).min(lh) {
                        for x in wx * win..((wx + 1) * win).min(lw) {
                            groups.push(first + y * lw + x);
                        }
                    }
                    let n = groups.len() - before;
                    if n > 0 {
                        segments.push(n * unit);
                    }
                }
            }
        }
        base += t * lh * lw;
    }
    let rows = groups
        .iter()
        .flat_map(|&g| g * unit..(g + 1) * unit)
        .collect();
    let mut restore = vec![0; groups.len()];
    for (k, &g) in groups.iter().enumerate() {
        restore[g] = k;
    }
    WindowLayout {
        groups,
        rows,
        restore,
        segments,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers' `get_vision_window_index` on the fixture's grids (window_size 56, patch
    /// 14, merge 2: 2 x 2 merged tokens per window), as recorded in the Qwen2.5-VL fixture.
    #[test]
    fn window_order_matches_transformers() {
        let one = window_layout(&[[1, 4, 6]], 2, 2);
        assert_eq!(one.groups, vec![0, 1, 3, 4, 2, 5]);
        assert_eq!(one.segments, vec![16, 8]);
        let two = window_layout(&[[1, 4, 8], [1, 6, 8]], 2, 2);
        assert_eq!(
            two.groups,
            vec![0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15, 16, 17, 18, 19]
        );
        // transformers' cumulative lengths [0, 16, 32, 48, 64, 72, 80].
        assert_eq!(two.segments, vec![16, 16, 16, 16, 8, 8]);
        for (k, &g) in two.groups.iter().enumerate() {
            assert_eq!(two.restore[g], k);
        }
        assert_eq!(&two.rows[..8], &[0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(&two.rows[8..12], &[16, 17, 18, 19]);
    }

    /// Frames of one image are windowed apart; an image that is one window keeps its order.
    #[test]
    fn frames_are_windowed_apart() {
        let l = window_layout(&[[2, 2, 2]], 2, 4);
        assert_eq!(l.groups, vec![0, 1]);
        assert_eq!(l.segments, vec![4, 4]);
        assert_eq!(l.rows, (0..8).collect::<Vec<_>>());
    }
}
