"""Records on disk: the wire form, compressed with zstd and a dictionary trained on the
database's own records.

Identifier records are small (a few hundred bytes) and alike: the same value types, URL
prefixes, e-mail domains, and the identifier itself repeated inside its URL. A general
compressor gains little on one small record; with a dictionary learnt from a sample of them it
takes a typical record from ~200 bytes to ~45. That is what lets a single node hold the Wuhan
top-level node's 444 million registrations on one disk.

Stored form of the ``record`` column: a byte 0x01, the dictionary id (varint), the zstd frame
(no content size, no checksum, no dictionary id: SQLite pages carry their own integrity
checks); or the uncompressed wire form (which starts with 0x0A) for records written before the
database had a dictionary. Both are read back the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import zstandard

from resolver.wire import varint

COMPRESSED = 0x01
MAX_RECORD_BYTES = 4 * 1024 * 1024
DICTIONARY_BYTES = 16 * 1024
TRAIN_AFTER_RECORDS = 5000
"""A database with no dictionary trains one once it holds this many records."""


class UnknownDictionary(KeyError):
    """A record was compressed with a dictionary this process has not loaded (another worker
    trained it): reload the dictionaries and try again."""


class RecordCompression:
    def __init__(self) -> None:
        self._compressors: dict[int, zstandard.ZstdCompressor] = {}
        self._decompressors: dict[int, zstandard.ZstdDecompressor] = {}
        self._dictionaries: dict[int, bytes] = {}
        self.current = 0
        """The dictionary new records are compressed with (0: none yet, stored as they are)."""
        self._header = b""
        self._compress: Callable[[bytes], bytes] = bytes

    def knows(self, dictionary_id: int) -> bool:
        return dictionary_id in self._decompressors

    def dictionary(self, dictionary_id: int) -> bytes:
        """The raw bytes of a loaded dictionary (to hand to processes that compress for us)."""
        return self._dictionaries[dictionary_id]

    def add(self, dictionary_id: int, data: bytes) -> None:
        self._dictionaries[dictionary_id] = data
        d = zstandard.ZstdCompressionDict(data)
        self._compressors[dictionary_id] = zstandard.ZstdCompressor(
            level=3, dict_data=d, write_content_size=False, write_checksum=False, write_dict_id=False
        )
        self._decompressors[dictionary_id] = zstandard.ZstdDecompressor(dict_data=d)
        self.current = max(self.current, dictionary_id)
        self._header = bytes([COMPRESSED]) + varint(self.current)
        self._compress = self._compressors[self.current].compress

    def encode(self, record: bytes) -> bytes:
        if not self.current:
            return record
        return self._header + self._compress(record)

    def encode_many(self, records: Sequence[bytes]) -> list[bytes]:
        """``encode`` of each record, in one call into zstd (a batch's records)."""
        if not self.current or not records:
            return list(records)
        header = self._header
        frames = self._compressors[self.current].multi_compress_to_buffer(list(records))
        return [header + frames[i].tobytes() for i in range(len(frames))]

    def decode(self, stored: bytes) -> bytes:
        if not stored or stored[0] != COMPRESSED:
            return stored
        dictionary_id = stored[1]
        pos = 2
        if dictionary_id >= 0x80:  # a varint of more than one byte
            dictionary_id = shift = 0
            pos = 1
            while True:
                byte = stored[pos]
                pos += 1
                dictionary_id |= (byte & 0x7F) << shift
                if byte < 0x80:
                    break
                shift += 7
        decompressor = self._decompressors.get(dictionary_id)
        if decompressor is None:
            raise UnknownDictionary(dictionary_id)
        # The frame carries no content size. decompress() would then allocate its whole
        # max_output_size (4 MiB) for each ~200-byte record, 20-30x the work of decoding it; a
        # decompression object grows its output as it goes.
        stream = decompressor.decompressobj()
        record = stream.decompress(stored[pos:])
        if not stream.eof or len(record) > MAX_RECORD_BYTES:
            raise zstandard.ZstdError(f"stored record is truncated or over {MAX_RECORD_BYTES} bytes")
        return record

    @staticmethod
    def train(samples: Sequence[bytes]) -> bytes:
        """A dictionary learnt from sample records (their wire form)."""
        return bytes(zstandard.train_dictionary(DICTIONARY_BYTES, list(samples)).as_bytes())
