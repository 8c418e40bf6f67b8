"""Image files read safely: what a folder of class folders holds (links that leave the dataset, loops, pipes and
devices left out), decoded into the uint8 squares the cache stores (decompression bombs and extreme strips
refused, any PIL mode made RGB)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from tl_sweep.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def image_files(folder: Path, root: Path, skipped: list[str]) -> list[Path]:
    """The regular files under ``folder``, following links only where they stay inside ``root`` and do not
    lead back to a folder already read (a loop): anything else is left out and listed in ``skipped``."""
    top = os.path.realpath(root)
    seen = {os.path.realpath(folder)}
    out = []

    def rel(p: str) -> str:
        return os.path.relpath(p, root)

    for here, dirs, names in os.walk(folder, followlinks=True):
        keep = []
        for d in sorted(d for d in dirs if not d.startswith(".")):
            real = os.path.realpath(os.path.join(here, d))
            if not inside(real, top):
                skipped.append(f"{rel(os.path.join(here, d))}: a link to {real}, outside the data root")
            elif real in seen:
                skipped.append(f"{rel(os.path.join(here, d))}: a link back to a folder already read (a loop)")
            else:
                seen.add(real)
                keep.append(d)
        dirs[:] = keep
        for n in sorted(n for n in names if not n.startswith(".")):
            p = os.path.join(here, n)
            real = os.path.realpath(p)
            if not inside(real, top):
                skipped.append(f"{rel(p)}: a link to {real}, outside the data root")
            elif not os.path.exists(p):
                skipped.append(f"{rel(p)}: a broken link or a link loop")
            elif not os.path.isfile(p):
                skipped.append(f"{rel(p)}: not a regular file (a pipe or a device)")
            else:
                out.append(Path(p))
    return out


def scan_classes(folder: Path, where: str, root: Path, skipped: list[str]) -> dict[str, list[Path]]:
    if not folder.is_dir():
        raise UserError(f"{where}: {folder} is not a folder; it must hold one folder per class")
    top = os.path.realpath(root)
    classes = {}
    for d in sorted(folder.iterdir()):
        if d.name.startswith("."):
            continue
        real = os.path.realpath(d)
        if d.is_symlink() and (not inside(real, top) or not d.is_dir()):
            why = f"a link to {real}, outside the data root" if d.is_dir() else "a broken link or a link loop"
            skipped.append(f"{d.relative_to(root)}: {why}")
        elif d.is_dir():
            classes[d.name] = image_files(d, root, skipped)
    if not classes:
        raise UserError(f"{where}: {folder} has no class folders; put each class's images in {folder}/<class>/")
    empty = [c for c, f in classes.items() if not f]
    if empty:
        left = [x for x in skipped if x.startswith(str((folder / empty[0]).relative_to(root)) + os.sep)]
        why = (f" ({len(left)} entries there were left out: links outside the data root, loops or non-files; "
               f"first: {left[0]})" if left else "")
        raise UserError(f"{where}: class folder {folder / empty[0]} has no images{why}; add images or remove it")
    return classes


def fingerprint(files: list[tuple[str, Path]]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for rel, path in files:
        h.update(f"{rel}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def to_rgb(img) -> "Image.Image":  # noqa: F821
    """Any PIL mode as 8-bit RGB: alpha composited on white, 16-bit and float scaled, CMYK/P/LA converted."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray((a / top * 255).clip(0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB")


class Unusable(Exception):
    """An image file that decodes, but must not be: too many pixels, or a shape no crop can use."""


MAX_PIXELS = 89_478_485  # PIL's own bomb threshold (a warning there; here the image is skipped)
MAX_ASPECT = 20.0  # a centre crop of a longer strip would keep under 5% of it


def decode(path: Path, size: int) -> np.ndarray:
    """One image file → uint8 3×S×S, as torchvision's Resize(S) + CenterCrop(S) would see it, upright.

    Its header is read first: an image over ``MAX_PIXELS`` (a decompression bomb: a small PNG that decodes
    to gigapixels) or longer than ``MAX_ASPECT``:1 raises :class:`Unusable` before any pixel is decoded; a
    large JPEG is decoded at a reduced scale (``draft``). EXIF orientation is applied (a phone's portrait
    photo is stored sideways). Memory stays within a few bytes per allowed pixel.
    """
    import warnings

    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():  # over MAX_PIXELS PIL warns; the check below then skips the image
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as e:
        raise Unusable(f"a decompression bomb ({str(e).split('exceeds')[0].strip()})") from None
    with im:
        w, h = im.size
        if max(w, h) > MAX_ASPECT * min(w, h):
            raise Unusable(f"{w}×{h} pixels, longer than {MAX_ASPECT:.0f}:1; crop it to the object")
        if w * h > MAX_PIXELS and im.format == "JPEG":
            im.draft("RGB", (size, size))  # DCT scaling: 1/2, 1/4 or 1/8 of the pixels, still ≥ S a side
        if im.size[0] * im.size[1] > MAX_PIXELS:
            raise Unusable(f"{w}×{h} pixels, over the {MAX_PIXELS / 1e6:.0f} Mpx limit (a decompression bomb?); "
                           f"downscale it")
        im.load()  # truncated files fail here, not later
        return square(ImageOps.exif_transpose(im), size)


def square(img, size: int) -> np.ndarray:
    """A PIL image of any mode → uint8 3×S×S (RGB, the centre square resized to S: only those pixels are
    resampled, so a long image costs no more than its square)."""
    from PIL import Image

    rgb = to_rgb(img)
    w, h = rgb.size
    m = min(w, h)
    left, top = (w - m) // 2, (h - m) // 2
    rgb = rgb.resize((size, size), Image.BILINEAR, box=(left, top, left + m, top + m), reducing_gap=None)
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
