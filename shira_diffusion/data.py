"""Training examples: (image, caption) pairs from a local folder or a `datasets` dataset, all checked up front.

Invariant: `load_examples` returns only examples whose image decodes exactly as the trainer will decode it and
whose caption is a non-empty string, or raises `DatasetError` naming the folder / dataset, the file or row, and
what was expected and found. It runs before any model loads, opens only regular files (a FIFO named like an
image would block forever), refuses images whose header claims more pixels than PIL's limit before decoding
them, and writes nothing but the `datasets` cache (HF_DATASETS_CACHE, or `cache_dir`), never into the folder.

The sources, flag for flag as diffusers' DreamBooth LoRA scripts (train_dreambooth_lora_sdxl.py and others):
- `train_data_dir` (--train_data_dir / --instance_data_dir): the regular image files directly in a folder. A
  `metadata.jsonl` there (the imagefolder convention, one `{"file_name": "0001.png", "text": "..."}` per line)
  is read by `datasets`' own `imagefolder` builder and its `text` column (or `caption_column`) captions the
  images it names; an image without a row takes the caption in `NAME.txt` beside it, else `instance_prompt`.
- `dataset_name` (--dataset_name): a Hub id or a local folder, read with `datasets.load_dataset(name,
  dataset_config_name, cache_dir=...)`, or a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`
  (read with `datasets.load_from_disk`). The split "train" is used, else the only split. Images come from
  `image_column`; captions from `caption_column`, or, when that is None, `instance_prompt` for every image.

Usage:
    examples = load_examples(DataSource(dataset_name="user/style", caption_column="text"))
    dataset = StyleDataset(examples, resolution=1024, center_crop=False, random_flip=True, seed=0)
"""

from __future__ import annotations

import io
import os
import random
import stat
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .quiet import datasets_quiet

if TYPE_CHECKING:  # `datasets` (pyarrow, pandas) is imported only when a dataset is read
    import datasets as hf_datasets

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# What decoding a bad file can raise: not an image, truncated data, a decompression bomb, not a regular file.
IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)
METADATA_NAME = "metadata.jsonl"
FOLDER_CAPTION_COLUMN = "text"  # the imagefolder convention's caption column in metadata.jsonl
MAX_RESOLUTION = 4096  # SD / SDXL train at <= 1024; this bounds one batch's memory before any model loads
VAE_FACTOR = 8  # SD / SDXL VAEs downsample by 8: the latent of a multiple of 8 has whole-pixel sizes


class DatasetError(ValueError):
    """Training data is unusable; the message names the folder or dataset, the file or row, and what is wrong."""


@dataclass(frozen=True)
class DataSource:
    """The data flags of one run (diffusers' names and defaults); exactly one of train_data_dir / dataset_name.
    Usage: DataSource(train_data_dir="bluefire/", instance_prompt="blue fire style")"""

    train_data_dir: str | None = None
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    image_column: str = "image"
    caption_column: str | None = None
    cache_dir: str | None = None
    instance_prompt: str | None = None


# ---- files ---------------------------------------------------------------------------------------------------
def check_resolution(resolution: int, flag: str = "--resolution") -> None:
    """Refuse a square training / sampling size the VAE cannot take (not a positive multiple of 8) or too large
    to be meant (over MAX_RESOLUTION). Usage: check_resolution(512)"""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < VAE_FACTOR or resolution % VAE_FACTOR:
        raise ValueError(f"{flag} must be a positive multiple of {VAE_FACTOR}, got {resolution!r}")
    if resolution > MAX_RESOLUTION:
        raise ValueError(f"{flag} must be at most {MAX_RESOLUTION}, got {resolution} (SD / SDXL are trained at 512 to 1024)")


def list_images(folder: Path) -> list[Path]:
    """Regular image files directly in `folder` (symlinks to them too), sorted by name. Other entries with an
    image suffix (a FIFO, a socket, a device, a folder, a broken link) are left out: opening a FIFO blocks forever.
    Usage: images = list_images(Path("bluefire"))"""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())  # stat, no open


def irregular_entries(folder: Path) -> list[tuple[Path, str]]:
    """(entry, what it is) for each entry with an image suffix that `list_images` leaves out, sorted by name.
    Usage: for path, kind in irregular_entries(folder): print(path, kind)"""
    return [(path, _entry_kind(path)) for path in sorted(folder.iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES and not path.is_file()]


def _entry_kind(path: Path) -> str:
    """'a FIFO', 'a folder', ... for an entry that is not a regular file (a link is judged by its target)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return "a broken symbolic link" if path.is_symlink() else "unreadable"
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISREG, "a regular file"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _open_regular_file(path: str | os.PathLike) -> BinaryIO:
    """`path` opened for reading, refused (DatasetError) unless it is a regular file. Opened non-blocking and
    checked on the open descriptor: a FIFO opens at once (no writer needed) and cannot be swapped in after a check."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise DatasetError(f"{os.fspath(path)}: {_entry_kind(Path(path))}, not a regular file")
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def open_image(source: str | os.PathLike | BinaryIO) -> Image.Image:
    """A file (or open binary file, e.g. io.BytesIO of a dataset's image bytes) as the 8-bit RGB image a viewer
    shows: EXIF orientation applied (phone photos are stored sideways with an Orientation tag) and high-bit-depth
    modes scaled to 8 bits, where PIL's convert("RGB") would clip them (a 16-bit PNG would come out nearly white).
    Decodes the whole file, so truncated data raises here. A path that is not a regular file raises DatasetError
    without blocking. An image whose header claims more pixels than PIL's `Image.MAX_IMAGE_PIXELS` raises
    Image.DecompressionBombError before any pixel is decoded (PIL itself only warns up to twice the limit).
    Usage: image = open_image("photo.jpg")
    """
    with ExitStack() as stack:
        file = stack.enter_context(_open_regular_file(source)) if isinstance(source, (str, os.PathLike)) else source
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                handle = Image.open(file)  # reads the header only; the size check happens here
            except Image.DecompressionBombWarning as warning:
                raise Image.DecompressionBombError(f"{warning} (PIL's Image.MAX_IMAGE_PIXELS)") from None
            except UnidentifiedImageError:
                if file is not source:
                    raise
                raise UnidentifiedImageError("not an image format PIL can read") from None  # not "<_io.BytesIO object at 0x..>"
        with handle:
            image = ImageOps.exif_transpose(handle)
            image.load()
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grey (Pillow < 10 opens those PNGs as "I")
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8))
    elif image.mode == "F":  # float: [0, 1] as written by most tools, else the 16-bit range
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else 1 / 257.0
        image = Image.fromarray(np.clip(np.nan_to_num(values) * scale, 0, 255).round().astype(np.uint8))
    return image.convert("RGB")


# ---- the examples --------------------------------------------------------------------------------------------
class _RowImages(Sequence):
    """A dataset's image cells, undecoded ({"bytes", "path"} dicts), read one row at a time (memory-mapped)."""

    def __init__(self, dataset: hf_datasets.Dataset, column: str):
        import datasets

        self.column = column
        self.rows = dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index][self.column]

    def __iter__(self) -> Iterator[dict]:
        for batch in self.rows.iter(batch_size=64):
            yield from batch[self.column]


class ImageCaptions(Sequence):
    """The examples of one source: `x[i]` -> (PIL image in RGB, caption), decoded on each access exactly as
    `load_examples` checked it; `x.name(i)` names the file or row for messages; `x.describe()` says what was read.
    Attributes: `images` (a folder's image Paths, or a dataset's undecoded {"bytes", "path"} cells), `captions`.
    Pickles (DataLoader workers): a dataset's rows stay memory-mapped from its Arrow files.
    Usage: image, caption = examples[0]"""

    def __init__(self, images: Sequence[Path | dict], captions: list[str], description: str, row_label: str | None = None):
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        self.images, self.captions, self.description, self.row_label = images, captions, description, row_label

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        index = self._checked_index(index)
        return _open_cell(self.images[index], self.name(index)), self.captions[index]

    def name(self, index: int) -> str:
        """The file of example `index` (a folder), or its dataset row ("dataset x (split train) row 3")."""
        index = self._checked_index(index)
        image = self.images[index]
        return str(image) if isinstance(image, Path) else f"{self.row_label} row {index}"

    def describe(self) -> str:
        return self.description

    def __repr__(self) -> str:
        return f"ImageCaptions({self.description})"

    def _checked_index(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        return index % len(self)


def _open_cell(image: Path | dict, where: str) -> Image.Image:
    """A folder's image file or a dataset's image cell ({"bytes", "path"}) decoded by `open_image`."""
    if isinstance(image, Path):
        return open_image(image)
    if image.get("bytes") is not None:
        return open_image(io.BytesIO(image["bytes"]))
    path = image.get("path")
    if not path or "://" in path:  # datasets resolves remote files while loading; what is left must be local
        raise DatasetError(f"{where}: the image cell holds no bytes and no local file (path {path!r})")
    return open_image(path)


def _check_images(examples: ImageCaptions) -> None:
    """Decode every image once, as training will, so a bad one is reported now and not at its first batch. A full
    decode: PIL's verify() does not read JPEG data, so it passes truncated files."""
    for index, image in enumerate(examples.images):
        where = examples.name(index)
        try:
            _open_cell(image, where)
        except IMAGE_ERRORS as error:
            raise DatasetError(f"{where}: unreadable image ({error})") from None


def load_examples(source: DataSource, *, limit: int | None = None, caption: str | None = None) -> ImageCaptions:
    """All examples of `source` (the first `limit` if given: a folder's by name, a dataset's by row), every image
    decoded once and every caption checked; raises DatasetError. `caption`: every example gets it instead of its
    own (DreamBooth class images get --class_prompt), and no captions are read.
    Usage: examples = load_examples(DataSource(train_data_dir="bluefire/"), limit=100)"""
    if (source.train_data_dir is None) == (source.dataset_name is None):
        given = "both" if source.train_data_dir is not None else "neither"
        raise DatasetError(f"give exactly one of --train_data_dir (--instance_data_dir) and --dataset_name, got {given}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of examples, got {limit!r}")
    if source.train_data_dir is not None:
        examples = _folder_examples(Path(source.train_data_dir), source, limit, caption)
    else:
        examples = _dataset_examples(source, limit, caption)
    _check_images(examples)
    return examples


# ---- a local folder ------------------------------------------------------------------------------------------
@dataclass
class FolderScan:
    """What a folder holds, before any image is decoded. `rows`: image file name -> its metadata.jsonl row (all
    columns), None when metadata.jsonl exists but cannot be read at all; `captions`: image file name -> caption
    (its row's caption column, else its .txt file); `problems`: (file or "metadata.jsonl:LINE", what is wrong)."""

    folder: Path
    images: list[Path]
    rows: dict[str, dict] | None = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)


def scan_folder(folder: str | Path, caption_column: str = FOLDER_CAPTION_COLUMN, cache_dir: str | None = None) -> FolderScan:
    """The images, metadata rows, captions and every caption problem of a training folder (raises only if the
    folder is missing). Usage: scan = scan_folder("bluefire/"); print(scan.problems)"""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: training data folder does not exist")
    scan = FolderScan(folder, list_images(folder))
    metadata = folder / METADATA_NAME
    if os.path.lexists(metadata):
        _scan_metadata(scan, metadata, caption_column, cache_dir)
    elif caption_column != FOLDER_CAPTION_COLUMN:
        scan.problems.append((METADATA_NAME, f"no such file, so there is no caption column {caption_column!r} (--caption_column)"))
    if scan.rows is not None:
        _scan_text_files(scan)
    return scan


def _scan_metadata(scan: FolderScan, metadata: Path, caption_column: str, cache_dir: str | None) -> None:
    """metadata.jsonl through datasets' imagefolder builder; each row checked (image, caption, one row per image)."""
    if not metadata.is_file():  # a FIFO would block the read forever
        scan.rows = None
        scan.problems.append((METADATA_NAME, f"{_entry_kind(metadata)}, not a regular file"))
        return
    try:
        rows = _read_metadata(metadata, cache_dir)
    except Exception as error:  # noqa: BLE001 -- datasets / pyarrow raise many types; located or reported below
        scan.rows = None
        scan.problems.append(_locate_metadata_problem(metadata, caption_column) or (METADATA_NAME, f"datasets could not read it ({_root_message(error)})"))
        return
    lines = _row_lines(metadata)
    where = (lambda row: f"{METADATA_NAME}:{lines[row]}") if len(lines) == len(rows) else (lambda row: f"{METADATA_NAME} row {row + 1}")
    has_captions = caption_column in rows.column_names
    if not has_captions:
        columns = ", ".join("file_name" if c == "image" else c for c in rows.column_names)
        scan.problems.append((METADATA_NAME, f"no {caption_column!r} caption column (columns: {columns})"))
    images = {path.name for path in scan.images}
    for row, values in enumerate(rows.to_list()):
        problem = _scan_row(scan, values, images, caption_column if has_captions else None)
        if problem:
            scan.problems.append((where(row), problem))


def _scan_row(scan: FolderScan, values: dict, images: set[str], caption_column: str | None) -> str | None:
    """Record one metadata row (its image's row and caption) in `scan`; what is wrong with it, None if nothing."""
    cell = values.pop("image", None)
    if not cell or not cell.get("path"):
        return "\"file_name\" must be a file name, got null"
    name = os.path.relpath(cell["path"], scan.folder)
    problem = _row_file_problem(scan, name, images)
    if problem:
        return problem
    scan.rows[name] = {"file_name": name, **values}
    if caption_column is None:
        return None
    text = values[caption_column]
    if not isinstance(text, str) or not text.strip():  # null would otherwise train the caption "None"
        return f"\"{caption_column}\" of {name} must be a non-empty string, got {_json(text)}"
    scan.captions[name] = text
    return None


def _read_metadata(metadata: Path, cache_dir: str | None) -> hf_datasets.Dataset:
    """The rows of metadata.jsonl, read by datasets' imagefolder builder (file_name -> an
    undecoded "image" cell with the image's path). Only the metadata file is given as data: the builder reads
    the rows it names and opens no image (images without a row are this module's to caption)."""
    import datasets

    with datasets_quiet():
        loaded = datasets.load_dataset("imagefolder", data_files={"train": [str(metadata)]}, split="train", cache_dir=cache_dir)
    return loaded.cast_column("image", datasets.Image(decode=False))


def _row_file_problem(scan: FolderScan, name: str, images: set[str]) -> str | None:
    """What is wrong with the image a metadata row names (None: nothing): missing, not an image file directly in
    the folder, or named by an earlier row. A row for a missing image is a typo or a deleted file: never dropped."""
    if name not in images:
        path = scan.folder / name
        found = "no such file" if not os.path.lexists(path) else f"{_entry_kind(path)}, not an image file ({', '.join(IMAGE_SUFFIXES)}) directly in the folder"
        return f"\"file_name\" {name!r}: {found}"
    if name in scan.rows:
        return f"a second row for {name} (one row per image)"
    return None


def _scan_text_files(scan: FolderScan) -> None:
    """NAME.txt beside each image without a metadata row (imagefolder does not read them): UTF-8, not empty."""
    for image in scan.images:
        text_file = image.with_suffix(".txt")
        if image.name in scan.rows or not text_file.is_file():  # a metadata row is the caption's one source
            continue
        try:
            text = text_file.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as error:
            scan.problems.append((text_file.name, f"not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start})"))
            continue
        if text:
            scan.captions[image.name] = text
        else:
            scan.problems.append((text_file.name, f"empty caption for {image.name}"))


def _row_lines(metadata: Path) -> list[int]:
    """The line number of each row: the non-blank lines (the JSON reader skips blank ones). bytes.splitlines
    splits at \\n / \\r only (str.splitlines also at \\x1c, \\u2028 ...: line numbers would drift)."""
    return [number for number, raw in enumerate(metadata.read_bytes().splitlines(), 1) if raw.strip()]


def _locate_metadata_problem(metadata: Path, caption_column: str) -> tuple[str, str] | None:
    """After datasets refused metadata.jsonl: the first line that is not UTF-8, not a JSON object, or has a
    file_name or caption of the wrong type, as ("metadata.jsonl:LINE", what); None if no line is to blame."""
    import json

    raws = metadata.read_bytes().splitlines()
    if not any(raw.strip() for raw in raws):
        return METADATA_NAME, f"no rows (one {{\"file_name\": ..., \"{caption_column}\": ...}} per line)"
    for number, raw in enumerate(raws, 1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM is allowed at the start of the file
        except UnicodeDecodeError as error:
            return f"{METADATA_NAME}:{number}", f"not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1})"
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):  # RecursionError: absurdly nested JSON
            row = None
        if not isinstance(row, dict):
            return f"{METADATA_NAME}:{number}", f"expected a JSON object {{\"file_name\": ..., \"{caption_column}\": ...}}"
        if not isinstance(row.get("file_name"), str) or not row["file_name"]:
            return f"{METADATA_NAME}:{number}", f"\"file_name\" must be a file name, got {_json(row.get('file_name'))}"
        if row.get(caption_column) is not None and not isinstance(row[caption_column], str):
            return f"{METADATA_NAME}:{number}", f"\"{caption_column}\" of {row['file_name']} must be a non-empty string, got {_json(row[caption_column])}"
    return None


def _folder_examples(folder: Path, source: DataSource, limit: int | None, caption: str | None) -> ImageCaptions:
    """The folder's images (the first `limit` by name) with their captions; see the module docstring."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: training data folder does not exist")
    for path, kind in irregular_entries(folder):
        warnings.warn(f"{path}: {kind}, not a regular file; skipped", stacklevel=3)
    images = list_images(folder)[:limit]
    if not images:
        raise DatasetError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in the training data folder")
    if caption is not None:
        return ImageCaptions(images, [caption] * len(images), f"{len(images)} images from folder {folder}")
    scan = scan_folder(folder, source.caption_column or FOLDER_CAPTION_COLUMN, source.cache_dir)
    if scan.problems:
        file, problem = scan.problems[0]
        more = f" (and {len(scan.problems) - 1} more problems: shira-diffusion dataset check {folder})" if len(scan.problems) > 1 else ""
        raise DatasetError(f"{folder / file}: {problem}{more}")
    missing = [p.name for p in images if p.name not in scan.captions]
    if missing and source.instance_prompt is None:
        if len(missing) == len(images) and not scan.captions:
            raise DatasetError(f"{folder}: no captions ({METADATA_NAME} or .txt files) and no --instance_prompt")
        raise DatasetError(f"{folder}: {len(missing)} of {len(images)} images have no caption, e.g. {missing[0]} "
                           f"(add it to {METADATA_NAME} or a .txt file beside it, or pass --instance_prompt)")
    captions = [scan.captions.get(p.name, source.instance_prompt) for p in images]
    return ImageCaptions(images, captions, f"{len(images)} images from folder {folder}")


# ---- a datasets dataset --------------------------------------------------------------------------------------
def _dataset_examples(source: DataSource, limit: int | None, caption: str | None) -> ImageCaptions:
    """The rows of --dataset_name's train split (the first `limit`), checked: image column, captions, not empty."""
    import datasets

    split, dataset = _train_split(_load_dataset(source), source.dataset_name)
    config = f"config {source.dataset_config_name}, " if source.dataset_config_name else ""
    label = f"dataset {source.dataset_name} ({config}split {split})"
    columns = ", ".join(dataset.column_names)
    if source.image_column not in dataset.column_names:
        raise DatasetError(f"{label}: no image column {source.image_column!r} (--image_column); its columns: {columns}")
    feature = dataset.features[source.image_column]
    if not isinstance(feature, datasets.Image):
        raise DatasetError(f"{label}: column {source.image_column!r} (--image_column) holds {feature}, not images (datasets.Image)")
    if len(dataset) == 0:
        raise DatasetError(f"{label}: no rows")
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
    captions = _dataset_captions(dataset, source, caption, label, columns)
    return ImageCaptions(_RowImages(dataset, source.image_column), captions, f"{label}, {len(dataset)} rows", row_label=label)


def _dataset_captions(dataset: hf_datasets.Dataset, source: DataSource, caption: str | None, label: str, columns: str) -> list[str]:
    """`caption` for every row, else the caption column's strings (each checked), else --instance_prompt."""
    import datasets

    if caption is not None:
        return [caption] * len(dataset)
    column = source.caption_column
    if column is None:
        if source.instance_prompt is None:
            raise DatasetError(f"{label}: no --caption_column and no --instance_prompt: name the column that holds the captions "
                               f"(its columns: {columns}) or give one prompt for every image")
        return [source.instance_prompt] * len(dataset)
    if column not in dataset.column_names:
        raise DatasetError(f"{label}: no caption column {column!r} (--caption_column); its columns: {columns}")
    feature = dataset.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise DatasetError(f"{label}: column {column!r} (--caption_column) holds {feature}, not captions (strings)")
    captions = list(dataset[column])
    for row, text in enumerate(captions):
        if not isinstance(text, str) or not text.strip():
            raise DatasetError(f"{label} row {row}: caption column {column!r} must hold a non-empty string, got {_json(text)}")
    return captions


def _load_dataset(source: DataSource) -> Any:
    """--dataset_name as diffusers' scripts load it (`load_dataset(name, config, cache_dir=...)`), or, for a
    folder written by save_to_disk, `load_from_disk`. The library's own errors become DatasetError."""
    import datasets
    import pyarrow

    name, path = source.dataset_name, Path(source.dataset_name)
    saved = path.is_dir() and any((path / f).is_file() for f in (datasets.config.DATASET_STATE_JSON_FILENAME, datasets.config.DATASETDICT_JSON_FILENAME))
    if saved and source.dataset_config_name is not None:
        raise DatasetError(f"{name}: a dataset saved with save_to_disk has no configs; drop --dataset_config_name {source.dataset_config_name}")
    try:
        if saved:
            return datasets.load_from_disk(str(path))
        return datasets.load_dataset(name, source.dataset_config_name, cache_dir=source.cache_dir)
    except (datasets.exceptions.DatasetsError, pyarrow.ArrowException, OSError, ValueError, KeyError, IndexError) as error:
        empty = _empty_saved_splits(path) if saved else []
        if empty:  # load_from_disk fails on a saved dataset without rows (no data files): say so
            raise DatasetError(f"dataset {name}: no rows (in {', '.join(empty)})") from None
        raise DatasetError(f"--dataset_name {name}: datasets could not load it ({_root_message(error)})") from error


def _empty_saved_splits(path: Path) -> list[str]:
    """The splits of a save_to_disk folder whose state lists no data files (the folder itself for a Dataset)."""
    import json

    import datasets

    state = datasets.config.DATASET_STATE_JSON_FILENAME
    folders = [path] if (path / state).is_file() else sorted(p for p in path.iterdir() if (p / state).is_file())
    try:
        return [f"split {folder.name}" if folder != path else "the dataset" for folder in folders
                if json.loads((folder / state).read_text(encoding="utf-8")).get("_data_files") == []]
    except (OSError, ValueError, AttributeError):  # an unreadable state: the library's own error says more
        return []


def _train_split(loaded: Any, name: str) -> tuple[str, hf_datasets.Dataset]:
    """The "train" split of a DatasetDict, else its only split; a Dataset is its own split."""
    if not isinstance(loaded, dict):  # a Dataset (load_from_disk of Dataset.save_to_disk)
        return str(loaded.split) if loaded.split else "train", loaded
    if "train" in loaded:
        return "train", loaded["train"]
    if len(loaded) == 1:
        return next(iter(loaded.items()))
    raise DatasetError(f"dataset {name}: no 'train' split and {len(loaded)} others to choose from: {', '.join(loaded) or 'none'}")


def _root_message(error: BaseException) -> str:
    """The innermost cause's message (datasets wraps the JSON reader's in "An error occurred while generating")."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {error}"


def _json(value: Any) -> str:
    import json

    return json.dumps(value, default=repr)


# ---- the torch dataset ---------------------------------------------------------------------------------------
class StyleDataset(torch.utils.data.Dataset):
    """Images resized to `resolution` (shorter side), cropped and flipped, in [-1, 1]; each example `repeats`
    times in a row (--repeats, as diffusers' SDXL script).

    Crops and flips draw from a generator seeded by (seed, epoch, index), not the global RNG, so a run
    resumed from a checkpoint sees exactly the augmentations of an uninterrupted one.
    Usage: StyleDataset(load_examples(source), 512, center_crop=False, random_flip=True, seed=0)[0]["pixel_values"]
    """

    def __init__(self, examples: ImageCaptions, resolution: int, center_crop: bool, random_flip: bool, seed: int, repeats: int = 1):
        check_resolution(resolution, "resolution")
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
        self.examples, self.resolution, self.repeats = examples, resolution, repeats
        self.center_crop, self.random_flip, self.seed, self.epoch = center_crop, random_flip, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.examples) * self.repeats

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} of {len(self)}")
        image, caption = self.examples[index // self.repeats]
        rng = random.Random(hash((self.seed, self.epoch, index)))
        original_size = (image.height, image.width)  # SDXL micro-conditioning: the size before resizing
        scale = self.resolution / min(image.size)
        width, height = max(self.resolution, round(image.width * scale)), max(self.resolution, round(image.height * scale))
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        if self.center_crop:
            left, top = (width - self.resolution) // 2, (height - self.resolution) // 2
        else:
            left, top = rng.randint(0, width - self.resolution), rng.randint(0, height - self.resolution)
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        return {"pixel_values": pixels, "caption": caption, "original_size": original_size, "crop_top_left": (top, left)}


def collate(batch: list[dict]) -> dict:
    """StyleDataset items as one batch. Usage: DataLoader(dataset, collate_fn=collate)"""
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in batch]),
        "captions": [item["caption"] for item in batch],
        "original_sizes": [item["original_size"] for item in batch],
        "crops_top_left": [item["crop_top_left"] for item in batch],
    }
