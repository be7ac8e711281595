"""Write a tiny Google Speech Commands v0.02 folder in the real layout (for tests).

``make_gsc_root(tmp_path)`` then ``load_gsc(root=tmp_path, download=False)`` loads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

WORDS = (
    "backward", "bed", "bird", "cat", "dog", "down", "eight", "five", "follow", "forward",
    "four", "go", "happy", "house", "learn", "left", "marvin", "nine", "no", "off", "on", "one",
    "right", "seven", "sheila", "six", "stop", "three", "tree", "two", "up", "visual", "wow",
    "yes", "zero",
)  # fmt: skip


@dataclass
class GSCFiles:
    """What ``make_gsc_root`` wrote: the dataset folder and the relative paths per split."""

    data_dir: Path
    train: list[str] = field(default_factory=list)
    valid: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)


def clip(rng: np.random.Generator, word_index: int, n_samples: int, sample_rate: int) -> np.ndarray:
    """A tone whose pitch depends on the word, with a little noise, faded in and out."""
    t = np.arange(n_samples) / sample_rate
    freq = 200.0 + 100.0 * word_index + rng.uniform(-20, 20)
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.02 * rng.standard_normal(n_samples)
    fade = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.05)
    return (x * fade).astype(np.float32)


def write_wav(path: Path, samples: np.ndarray, sample_rate: int = 16000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples, sample_rate, subtype="PCM_16")


def make_gsc_root(
    root: str | Path,
    words: tuple[str, ...] | list[str] | None = None,
    n_per_word: int = 4,
    sample_rate: int = 16000,
    seed: int = 0,
) -> GSCFiles:
    """Write ``root/speech_commands_v0.02`` with ``n_per_word`` clips of 0.5 to 1.2 s per word.

    Per word, the first clip goes to ``validation_list.txt``, the second to ``testing_list.txt``
    and the rest to training (so ``n_per_word >= 3`` fills every split). A
    ``_background_noise_`` folder and a README are written too, as in the archive.
    """
    rng = np.random.default_rng(seed)
    data_dir = Path(root) / "speech_commands_v0.02"
    out = GSCFiles(data_dir)
    for w, word in enumerate(words if words is not None else WORDS):
        for i in range(n_per_word):
            rel = f"{word}/{rng.integers(16**8):08x}_nohash_{i}.wav"
            n = int(rng.uniform(0.5, 1.2) * sample_rate)
            write_wav(data_dir / rel, clip(rng, w, n, sample_rate), sample_rate)
            (out.valid if i == 0 else out.test if i == 1 else out.train).append(rel)
    noise = 0.1 * rng.standard_normal(2 * sample_rate).astype(np.float32)
    write_wav(data_dir / "_background_noise_" / "white_noise.wav", noise, sample_rate)
    (data_dir / "_background_noise_" / "README.md").write_text("background noise, not a class\n")
    (data_dir / "README.md").write_text("tiny generated Speech Commands layout\n")
    (data_dir / "validation_list.txt").write_text("".join(f"{r}\n" for r in out.valid))
    (data_dir / "testing_list.txt").write_text("".join(f"{r}\n" for r in out.test))
    return out
