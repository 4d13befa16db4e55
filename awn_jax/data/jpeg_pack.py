"""An image folder as one compact file, and back: the JPEG bytes of every image concatenated.

A tar of CIFAR-10's 60,000 small JPEGs is 92 MB, mostly per-file headers and padding; the
bytes themselves are 57 MB. Packed into one ``.npz`` (bytes, offsets, relative paths) the
folder fits where a size limit applies (the 64 MiB a GPU machine receives here), and
unpacking writes the same files again, so the image-folder source reads them unchanged.

    python -m awn_jax.data.jpeg_pack pack ~/cifar10 cifar10.jpack.npz
    python -m awn_jax.data.jpeg_pack unpack cifar10.jpack.npz /tmp/cifar10
"""

from __future__ import annotations

import os
import pathlib
import sys

import numpy as np

from awn_jax.data.image_folder import SUFFIXES
from awn_jax.errors import UserError


def pack(folder: str, path: str) -> int:
    """Pack every image under ``folder`` into ``path``; returns the number of images."""
    root = pathlib.Path(folder).expanduser()
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in SUFFIXES)
    if not files:
        raise UserError(f"no {'/'.join(SUFFIXES)} images under {root}")
    blobs = [p.read_bytes() for p in files]
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    names = "\n".join(str(p.relative_to(root)) for p in files)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, data=np.frombuffer(b"".join(blobs), np.uint8), offsets=offsets,
             names=np.frombuffer(names.encode(), np.uint8))
    return len(files)


def unpack(path: str, folder: str) -> int:
    """Write the images of ``path`` under ``folder``; returns the number of images."""
    root = pathlib.Path(folder).expanduser()
    with np.load(path) as arrays:
        data, offsets = arrays["data"], arrays["offsets"]
        names = arrays["names"].tobytes().decode().split("\n")
    for index, name in enumerate(names):
        target = root / name
        if ".." in pathlib.PurePath(name).parts:
            raise UserError(f"{path}: a packed name leaves the folder: {name}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data[offsets[index]:offsets[index + 1]].tobytes())
    return len(names)


def main(argv) -> None:
    if len(argv) != 4 or argv[1] not in ("pack", "unpack"):
        sys.exit(__doc__)
    command, source, target = argv[1:]
    count = pack(source, target) if command == "pack" else unpack(source, target)
    print(f"{command}ed {count} images: {source} -> {target} "
          f"({os.path.getsize(target if command == 'pack' else source) / 2**20:.1f} MiB pack)")


if __name__ == "__main__":
    main(sys.argv)
