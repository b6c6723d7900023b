"""Parquet files of images as input shards (img2dataset's parquet output, HF datasets' image columns),
and `open_shard`, which picks the reader of an input shard by its suffix.

One Parquet file is one shard and one row one sample (its index is the row number). The file is read
a row group at a time (`ParquetFile.iter_batches` without pre-buffering), only the columns used, so a
reader holds one row group's chunks of those columns, never the file. Which column holds what
(`ParquetColumns`, the config's `parquet.*`; unset: found by name):
- the image: a binary column (img2dataset names it after its encode format: `jpg`, `png`, `webp`)
  or an HF datasets image struct `{bytes: binary, path: string}`, the first of `IMAGE_COLUMNS`;
- the caption: a string column, the first of `CAPTION_COLUMNS` (none: captions are null);
- the key: the `key` column as text (none, or a null cell: the row number).
Every row becomes a `shards.Sample`, good or an error with its reason, as a tar sample does: a null
image cell (img2dataset keeps its failed downloads, with their `status` and `error_message`), an
image struct without bytes (an image stored by path), an image over `max_member_bytes` or a caption
over `max_caption_bytes` (checked on the cell: Parquet has no per-cell header to check before the
read, so a row group's size is bounded by its writer); bytes that do not decode are the decode
stage's error rows. A file that is not Parquet, is cut short, whose pages do not read, whose rows
fall short of its footer's count, or that has no image column fails the shard (`ShardFormatError`);
the store's failures are `StorageFault`s, as for tars. The sample's `fields` are the row's cells of
the requested passthrough columns (a column the file lacks is left out: null in the corpus).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from dualtok.pipelines.io.shards import (
    Sample,
    ShardFormatError,
    ShardLimits,
    ShardReader,
    StoreHandle,
    describe,
    field_text,
    over_cap,
    stored_object,
)
from dualtok.pipelines.io.storage import PARQUET_SUFFIX, StorageFault

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img")  # img2dataset's formats, then HF datasets'
CAPTION_COLUMNS = ("caption", "txt", "text")
KEY_COLUMN = "key"
_FAILURE_COLUMNS = ("status", "error_message")  # img2dataset's reason for a row without an image
_BATCH_ROWS = 64  # rows decoded from Arrow at a time (a batch may span row groups)


@dataclass(frozen=True)
class ParquetColumns:
    """Which columns of a Parquet input shard hold the image, the caption and the key."""

    # a binary column or an HF image struct {bytes, path}; unset: jpg, jpeg, png, webp, image or img
    image_column: str | None = None
    caption_column: str | None = None  # a string column; unset: caption, txt or text, else no captions
    key_column: str | None = None  # unset: key, else the row number


def open_shard(uri: str, storage_options: dict[str, Any] | None = None, limits: ShardLimits = ShardLimits(),
               columns: ParquetColumns = ParquetColumns(),
               fields: tuple[str, ...] = ()) -> ShardReader | ParquetShardReader:
    """The reader of one input shard: a Parquet file by its suffix, else a tar (plain or compressed).
    `fields`: the columns a Parquet reader puts into each sample's `fields` (a tar's are its .json)."""
    if uri.endswith(PARQUET_SUFFIX):
        return ParquetShardReader(uri, storage_options, limits, columns, fields)
    return ShardReader(uri, storage_options, limits)


@dataclass(frozen=True)
class _Layout:
    """The columns one file is read through, found in its schema."""

    image: str
    image_struct: bool  # an HF image struct {bytes, path}, not a binary column
    caption: str | None
    key: str | None
    failure: tuple[str, ...]  # img2dataset's status/error_message, where present
    fields: tuple[str, ...]  # the requested passthrough columns the file has

    @property
    def columns(self) -> list[str]:
        named = [self.image, self.caption, self.key, *self.failure, *self.fields]
        return list(dict.fromkeys(c for c in named if c is not None))


class ParquetShardReader:
    """One pass over one Parquet shard, with `ShardReader`'s interface: iterating yields a `Sample`
    per row in row order, then checks every row of the footer was read; raises `ShardFormatError` or
    `StorageFault` otherwise. `size` and `version` describe the object read (set at open)."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None, limits: ShardLimits = ShardLimits(),
                 columns: ParquetColumns = ParquetColumns(), fields: tuple[str, ...] = ()) -> None:
        self.uri, self.storage_options, self.limits = uri, storage_options, limits
        self.columns, self.fields = columns, fields
        self.size, self.version = -1, ""
        self.samples = 0  # once iteration ended: rows in the file

    def __iter__(self) -> Iterator[Sample]:
        with stored_object(self.uri, self.storage_options) as (stream, self.size, self.version):
            yield from self._read(stream)

    def _read(self, stream: StoreHandle) -> Iterator[Sample]:
        import pyarrow.parquet as pq

        index = 0
        try:
            # no pre-buffering: pyarrow would read every row group's chunks at once, the whole file
            parquet = pq.ParquetFile(stream, pre_buffer=False)
            layout = self._layout(parquet.schema_arrow)
            for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=layout.columns, use_threads=False):
                for row in batch.to_pylist():
                    yield self._sample(index, row, layout)
                    index += 1
            expected = parquet.metadata.num_rows
        except (StorageFault, ShardFormatError):
            raise
        except Exception as err:  # noqa: BLE001 - pyarrow raises many types for bytes that are not Parquet
            if stream.fault is not None:  # the store failed under pyarrow, whatever pyarrow made of it
                raise stream.fault from err
            raise ShardFormatError(f"Parquet file cannot be read to its end after {index} rows: "
                                   f"{describe(err)}") from err
        if index != expected:
            raise ShardFormatError(f"the Parquet file holds {index} rows but its footer says {expected}")
        self.samples = index

    def _layout(self, schema: pa.Schema) -> _Layout:
        image = self._image_column(schema)
        caption = self._chosen(schema, self.columns.caption_column, CAPTION_COLUMNS, "caption_column", _is_string)
        key = self.columns.key_column or (KEY_COLUMN if KEY_COLUMN in schema.names else None)
        if key is not None and key not in schema.names:
            raise ShardFormatError(f"parquet.key_column {key!r} is not a column of this file ({_names(schema)})")
        failure = tuple(c for c in _FAILURE_COLUMNS if c in schema.names)
        fields = tuple(name for name in self.fields if name in schema.names)
        return _Layout(image, pa.types.is_struct(schema.field(image).type), caption, key, failure, fields)

    def _image_column(self, schema: pa.Schema) -> str:
        chosen = self._chosen(schema, self.columns.image_column, IMAGE_COLUMNS, "image_column", _is_image)
        if chosen is None:
            raise ShardFormatError(
                f"no image column: none of {', '.join(IMAGE_COLUMNS)} is a binary column or an image struct "
                f"{{bytes, path}} ({_names(schema)}); set parquet.image_column. (The index img2dataset and "
                "`dualtok shards` write beside a tar holds no images: list the .tar)")
        return chosen

    @staticmethod
    def _chosen(schema: pa.Schema, given: str | None, candidates: tuple[str, ...], key: str,
                fits: Callable[[pa.DataType], bool]) -> str | None:
        """The column `given` names (which must exist and fit), else the first candidate that fits."""
        if given is None:
            return next((c for c in candidates if c in schema.names and fits(schema.field(c).type)), None)
        if given not in schema.names:
            raise ShardFormatError(f"parquet.{key} {given!r} is not a column of this file ({_names(schema)})")
        if not fits(schema.field(given).type):
            raise ShardFormatError(f"parquet.{key} {given!r} is {schema.field(given).type}, which cannot hold "
                                   f"{'images' if key == 'image_column' else 'text'}")
        return given

    def _sample(self, index: int, row: dict[str, Any], layout: _Layout) -> Sample:
        key = field_text(row[layout.key]) if layout.key else None
        caption = row[layout.caption] if layout.caption else None
        sample = Sample(index=index, key=str(index) if key is None else key, caption=caption,
                        image_member=layout.image, fields={name: row[name] for name in layout.fields})
        cell = row[layout.image]
        data = cell.get("bytes") if layout.image_struct and cell is not None else cell
        sample.error = _row_problem(layout, row, data, caption, self.limits)
        if sample.error is None:
            sample.members[layout.image] = data
        return sample


def _row_problem(layout: _Layout, row: dict[str, Any], data: bytes | None, caption: str | None,
                 limits: ShardLimits) -> str | None:
    """Why a row cannot be a sample, or None."""
    cell = row[layout.image]
    if cell is None:
        failure = ", ".join(f"{c} {row[c]!r}" for c in layout.failure if row[c] is not None)
        return f"no image in column {layout.image!r}" + (f" ({failure})" if failure else "")
    if data is None:
        return (f"the image struct in column {layout.image!r} has no bytes (path {cell.get('path')!r}): "
                "images stored by path are not read")
    problem = over_cap(f"the image in column {layout.image!r}", len(data), False, limits)
    if problem is None and caption is not None:
        problem = over_cap(f"the caption in column {layout.caption!r}", len(caption.encode()), True, limits)
    return problem


def _is_image(tp: pa.DataType) -> bool:
    if pa.types.is_struct(tp):
        return tp.get_field_index("bytes") >= 0 and _is_binary(tp.field("bytes").type)
    return _is_binary(tp)


def _is_binary(tp: pa.DataType) -> bool:
    return pa.types.is_binary(tp) or pa.types.is_large_binary(tp)


def _is_string(tp: pa.DataType) -> bool:
    return pa.types.is_string(tp) or pa.types.is_large_string(tp)


def _names(schema: pa.Schema) -> str:
    names = schema.names
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    return f"columns: {shown or 'none'}"
