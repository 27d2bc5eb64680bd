"""Files damaged as a failing disk or a careless hand would damage them, for tests of what reads them back."""

from pathlib import Path


def flip_middle_bytes(path: Path, count: int = 64) -> None:
    """Invert ``count`` bytes in the middle of ``path``, keeping its size."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(byte ^ 0xFF for byte in data[middle:middle + count])
    path.write_bytes(bytes(data))


def swap_names(first: Path, second: Path) -> None:
    """Give each of two files the other's name."""
    aside = first.with_name(f".{first.name}.aside")
    first.rename(aside)
    second.rename(first)
    aside.rename(second)
