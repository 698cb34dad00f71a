//! Contact sheets a person can read at a glance: a title above the grid, a caption under every tile (what it
//! is: a sample's conditions, original or edited, a step), tiles scaled by whole factors so that the sheet is at
//! least [`MIN_WIDTH`] pixels wide (a 32x32 model's samples are not stamps), and 8-bit greyscale PNG. Text is drawn
//! with the public-domain 8x8 bitmap font of `font8x8`.

use radit_models::model::ModelError;
use tch::{Kind, Tensor};

/// The narrowest sheet written: small tiles are enlarged by whole factors up to it.
pub const MIN_WIDTH: usize = 512;
/// Pixels between tiles and around the grid.
const GAP: usize = 4;
const BACKGROUND: u8 = 40;
const INK: u8 = 235;
/// Caption lines under a tile, at most.
const CAPTION_LINES: usize = 3;
const LINE: usize = 10;

/// One tile: an image `[H, W]` in [-1, 1] and its caption (lines separated by `\n`). Every tile of a sheet has
/// the first tile's size.
pub struct Tile {
    pub image: Tensor,
    pub caption: String,
}

impl Tile {
    pub fn new(image: Tensor, caption: impl Into<String>) -> Self {
        Self {
            image,
            caption: caption.into(),
        }
    }
}

/// A sheet's layout before drawing: how each tile is scaled and how tall the text bands are.
struct Layout {
    columns: usize,
    rows: usize,
    /// Box-downscale factor of each tile (large images), then a whole-number enlargement (small ones).
    down: i64,
    up: usize,
    tile_w: usize,
    tile_h: usize,
    caption_h: usize,
    title_h: usize,
    width: usize,
    height: usize,
}

fn layout((h, w): (i64, i64), n: usize, columns: usize, max_tile: i64, captioned: bool) -> Layout {
    let columns = columns.clamp(1, n.max(1));
    let rows = n.div_ceil(columns).max(1);
    let down = ((h.max(w) + max_tile - 1) / max_tile.max(1)).max(1);
    let (small_h, small_w) = ((h / down).max(1) as usize, (w / down).max(1) as usize);
    let gaps = (columns + 1) * GAP;
    let up = MIN_WIDTH
        .saturating_sub(gaps)
        .div_ceil(columns * small_w)
        .max(1);
    let (tile_h, tile_w) = (small_h * up, small_w * up);
    let caption_h = if captioned {
        CAPTION_LINES * LINE + 2
    } else {
        0
    };
    let title_h = 2 * LINE + 4;
    let width = columns * tile_w + gaps;
    let height = title_h + rows * (tile_h + caption_h) + (rows + 1) * GAP;
    Layout {
        columns,
        rows,
        down,
        up,
        tile_w,
        tile_h,
        caption_h,
        title_h,
        width,
        height,
    }
}

/// Draws `text` at (x, y) in the 8x8 font, clipped to `max_width` pixels (characters past it are dropped and
/// the last shown becomes `~`).
fn draw_text(canvas: &mut [u8], width: usize, x: usize, y: usize, text: &str, max_width: usize) {
    let fits = max_width / 8;
    let chars: Vec<char> = text.chars().collect();
    let shown: Vec<char> = if chars.len() > fits && fits > 0 {
        chars[..fits - 1].iter().copied().chain(['~']).collect()
    } else {
        chars
    };
    let height = canvas.len() / width.max(1);
    for (k, c) in shown.iter().enumerate() {
        let glyph = font8x8::legacy::BASIC_LEGACY
            .get(*c as usize)
            .copied()
            .unwrap_or(font8x8::legacy::BASIC_LEGACY[b'?' as usize]);
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                let (px, py) = (x + k * 8 + col, y + row);
                if bits >> col & 1 == 1 && px < width && py < height {
                    canvas[py * width + px] = INK;
                }
            }
        }
    }
}

/// Wraps `caption` into at most [`CAPTION_LINES`] lines of `fits` characters: at `\n`, then at commas and
/// spaces where a line is too long.
fn wrap(caption: &str, fits: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for part in caption.split('\n') {
        let mut line = String::new();
        for word in part.split_inclusive([',', ' ']) {
            if !line.is_empty() && line.chars().count() + word.trim_end().chars().count() > fits {
                lines.push(std::mem::take(&mut line).trim_end().to_string());
            }
            line.push_str(word);
        }
        lines.push(line.trim_end().to_string());
    }
    lines.truncate(CAPTION_LINES);
    lines
}

/// The PNG bytes of a sheet of `tiles`, `columns` wide, each image box-downscaled to at most `max_tile` pixels
/// and enlarged so the sheet is at least [`MIN_WIDTH`] wide, with `title` above and each tile's caption below.
pub fn render(
    title: &str,
    tiles: &[Tile],
    columns: usize,
    max_tile: i64,
) -> Result<Vec<u8>, ModelError> {
    let (h, w) = tiles.first().map_or((1, 1), |t| {
        let s = t.image.size();
        (s[0], s.get(1).copied().unwrap_or(1))
    });
    let captioned = tiles.iter().any(|t| !t.caption.is_empty());
    let l = layout((h, w), tiles.len(), columns, max_tile, captioned);
    let mut canvas = vec![BACKGROUND; l.width * l.height];
    for (i, line) in wrap(title, (l.width - 2 * GAP) / 8)
        .iter()
        .take(2)
        .enumerate()
    {
        draw_text(
            &mut canvas,
            l.width,
            GAP,
            GAP + 2 + i * LINE,
            line,
            l.width - 2 * GAP,
        );
    }
    let small_w = (w / l.down).max(1) as usize;
    for (k, t) in tiles.iter().enumerate() {
        if t.image.size() != [h, w] {
            return Err(ModelError::BadInput {
                input: "contact sheet",
                reason: format!(
                    "tile {k} is {:?}, the first {h}x{w}: a sheet's tiles have one size",
                    t.image.size()
                ),
            });
        }
        let image = t.image.to_kind(Kind::Float).view([1, 1, h, w]);
        let image = if l.down > 1 {
            image.avg_pool2d(
                [l.down, l.down],
                [l.down, l.down],
                [0, 0],
                false,
                true,
                None,
            )
        } else {
            image
        };
        let v = Vec::<f32>::try_from(image.flatten(0, -1))?;
        let (col, row) = (k % l.columns, k / l.columns);
        let x0 = GAP + col * (l.tile_w + GAP);
        let y0 = l.title_h + GAP + row * (l.tile_h + l.caption_h + GAP);
        for y in 0..l.tile_h {
            let src = (y / l.up) * small_w;
            let line = &mut canvas[(y0 + y) * l.width + x0..(y0 + y) * l.width + x0 + l.tile_w];
            for (x, px) in line.iter_mut().enumerate() {
                let value = v.get(src + x / l.up).copied().unwrap_or(-1.0);
                *px = ((value.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8;
            }
        }
        for (i, text) in wrap(&t.caption, l.tile_w / 8).iter().enumerate() {
            draw_text(
                &mut canvas,
                l.width,
                x0,
                y0 + l.tile_h + 2 + i * LINE,
                text,
                l.tile_w,
            );
        }
    }
    debug_assert_eq!(l.rows, tiles.len().div_ceil(l.columns).max(1));
    Ok(radit_sharding::image::encode_png8(
        l.width as u32,
        l.height as u32,
        png::ColorType::Grayscale,
        &canvas,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_tiles_are_enlarged_to_the_minimum_width_and_captions_are_drawn() {
        let tiles: Vec<Tile> = (0..4)
            .map(|i| {
                Tile::new(
                    Tensor::zeros([32, 32], (Kind::Float, tch::Device::Cpu)),
                    format!("#{i} sex=Female"),
                )
            })
            .collect();
        let l = layout((32, 32), 4, 2, 256, true);
        assert!(l.width >= MIN_WIDTH, "{}", l.width);
        assert_eq!(l.tile_w % 32, 0, "whole-number enlargement");
        let png = render("step 600", &tiles, 2, 256).unwrap();
        let decoded = png::Decoder::new(std::io::Cursor::new(png));
        let mut reader = decoded.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.width as usize, l.width);
        // Text is drawn: the title band and the captions hold ink; a tile of zeros is mid-grey.
        let ink = buf.iter().filter(|&&p| p == INK).count();
        assert!(ink > 100, "{ink} pixels of ink");
        let mid = buf[(l.title_h + GAP + 5) * l.width + GAP + 5];
        assert_eq!(mid, 128);
    }

    #[test]
    fn tiles_that_are_not_square_keep_their_shape_and_a_mismatched_one_is_named() {
        let tile = |h, w| Tile::new(Tensor::zeros([h, w], (Kind::Float, tch::Device::Cpu)), "");
        let l = layout((16, 32), 2, 2, 256, false);
        assert_eq!(l.tile_w, 2 * l.tile_h);
        assert!(render("wide", &[tile(16, 32), tile(16, 32)], 2, 256).is_ok());
        let e = render("mixed", &[tile(16, 32), tile(16, 16)], 2, 256).unwrap_err();
        assert!(e.to_string().contains("tile 1"), "{e}");
    }

    #[test]
    fn captions_wrap_at_commas_and_are_capped() {
        let lines = wrap("sex=Female,view=PA,age=63,cardiomegaly=positive", 16);
        assert_eq!(
            lines,
            ["sex=Female,", "view=PA,age=63,", "cardiomegaly=positive"]
        );
        assert_eq!(wrap("a\nb\nc\nd", 16).len(), CAPTION_LINES);
    }
}
