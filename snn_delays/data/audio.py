"""Log-mel front end of the GSC experiments, in plain torch (no torchaudio).

Clips are processed in batches, ``(B, N)`` waveforms to ``(B, T, n_mels)`` float32 features:

1. pad with zeros at the end, or cut, to ``clip_seconds`` at ``sample_rate`` (1 s at 16 kHz);
2. resample to ``target_rate`` (8 kHz) with a Hann-windowed sinc (band-limited) filter::

       y[j] = sum_i x[i] h(i / f_in - j / f_out)
       h(t) = (f_c / f_in) sinc(f_c t) cos^2(pi f_c t / (2 L))  for |f_c t| <= L, else 0

   with ``sinc(u) = sin(pi u) / (pi u)``, ``f_c = rolloff * min(f_in, f_out)`` (rolloff 0.99,
   so the pass band ends just below the lower Nyquist frequency) and ``L = 6`` zero crossings
   each side. This is the kernel of torchaudio's default resampler (which the published code
   used), so the features agree with the published ones; nothing here imports torchaudio;
3. power spectrogram ``|STFT|^2``: periodic Hann window of ``win_length`` samples, hop 80
   (10 ms), centred frames with reflect padding, so ``1 + 8000 // 80 = 101`` frames;
4. triangular mel filter bank on the HTK scale ``m = 2595 log10(1 + f / 700)``, unnormalised
   (torchaudio's ``melscale_fbanks`` with ``norm=None``): filter ``k`` rises linearly from
   edge ``k`` to edge ``k + 1`` and falls to edge ``k + 2``, the ``n_mels + 2`` edges evenly
   spaced in mel from ``f_min`` to ``f_max``, evaluated at the FFT bin frequencies;
5. decibels: ``10 log10(max(x, 1e-10))``, optionally floored at each clip's peak - ``top_db``.

The published settings (``FrontEnd.published()``): n_fft = win_length = 256, f_min 50 Hz and
f_max 14 kHz although the Nyquist frequency is 4 kHz, so 53 of the 140 filters lie wholly above
the last FFT bin: they are all zero and their features a constant -100 dB.

The default (``FrontEnd()``) fixes that. f_max = Nyquist alone is not enough: with n_fft 256 the
bins are 31.25 Hz apart, and below about 500 Hz 140 HTK bands are narrower than that, so 7 low
filters would fall between two bins and be all zero as well. The default therefore zero-pads
each 256-sample window to a 512-point FFT (bins 15.6 Hz apart; same window, hop and frame
count): every one of the 140 filters then has weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

AMIN = 1e-10  # power floor before the log: silence maps to -100 dB


@dataclass(frozen=True)
class FrontEnd:
    """Front-end parameters; ``f_max=None`` means the Nyquist frequency of ``target_rate``."""

    sample_rate: int = 16000
    clip_seconds: float = 1.0
    target_rate: int = 8000
    n_fft: int = 512
    win_length: int = 256
    hop_length: int = 80
    n_mels: int = 140
    f_min: float = 50.0
    f_max: float | None = None
    top_db: float | None = None

    @classmethod
    def published(cls, n_mels: int = 140, top_db: float | None = None) -> FrontEnd:
        """The published settings, mel upper edge above the Nyquist frequency included."""
        return cls(n_fft=256, win_length=256, n_mels=n_mels, f_max=14000.0, top_db=top_db)

    @property
    def clip_samples(self) -> int:
        return round(self.clip_seconds * self.sample_rate)

    @property
    def n_frames(self) -> int:
        resampled = -(-self.clip_samples * self.target_rate // self.sample_rate)
        return 1 + resampled // self.hop_length

    @property
    def dt_ms(self) -> float:
        return 1000.0 * self.hop_length / self.target_rate


def pad_or_cut(waves: Tensor, n_samples: int) -> Tensor:
    """Zero-pad at the end, or keep the first ``n_samples``, along the last dimension."""
    n = waves.shape[-1]
    if n >= n_samples:
        return waves[..., :n_samples]
    return F.pad(waves, (0, n_samples - n))


def sinc_resample_kernel(
    orig_rate: int, new_rate: int, zero_crossings: int = 6, rolloff: float = 0.99
) -> tuple[Tensor, int]:
    """Polyphase kernels ``(p, 1, 2 * width + q)`` (float64) and ``width`` for ``resample``.

    With ``q / p = orig_rate / new_rate`` in lowest terms, output sample ``j = r p + s`` (phase
    ``s``) is the dot product of kernel ``s`` with the input samples ``r q - width ...
    r q + width + q - 1``.
    """
    g = math.gcd(orig_rate, new_rate)
    q, p = orig_rate // g, new_rate // g
    cutoff = rolloff * min(q, p)  # f_c, in units of g Hz
    width = math.ceil(zero_crossings * q / cutoff)
    offsets = torch.arange(-width, width + q, dtype=torch.float64)  # input sample - r q
    phases = torch.arange(p, dtype=torch.float64)
    # f_c * (input time - output time), in zero crossings of the sinc
    u = (offsets[None, :] / q - phases[:, None] / p) * cutoff
    u = u.clamp(-zero_crossings, zero_crossings)
    window = torch.cos(u * (math.pi / (2 * zero_crossings))) ** 2
    kernel = torch.special.sinc(u) * window * (cutoff / q)
    return kernel[:, None, :], width


def resample(waves: Tensor, orig_rate: int, new_rate: int) -> Tensor:
    """Band-limited resampling along the last dimension: ``N`` samples -> ``ceil(N p / q)``."""
    if orig_rate == new_rate:
        return waves
    kernel, width = sinc_resample_kernel(orig_rate, new_rate)
    p, _, taps = kernel.shape
    q = taps - 2 * width
    shape, n = waves.shape, waves.shape[-1]
    n_out = -(-n * p // q)
    # A stride-q convolution as a stride-1 one over q interleaved input phases (twice as fast
    # on CPU): kernel[s, c, m] = h_s[m q + c], blocks[b, c, r] = x_padded[b, r q + c].
    n_taps = -(-taps // q)
    kernel = F.pad(kernel, (0, n_taps * q - taps)).reshape(p, n_taps, q).transpose(1, 2)
    n_blocks = -(-n_out // p) + n_taps - 1
    flat = F.pad(waves.reshape(-1, n), (width, n_blocks * q - n - width))
    blocks = flat.reshape(flat.shape[0], n_blocks, q).transpose(1, 2)
    out = F.conv1d(blocks, kernel.to(waves))  # (B, p, n_blocks - n_taps + 1)
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)
    return out[:, :n_out].reshape(*shape[:-1], n_out)


def power_spectrogram(waves: Tensor, n_fft: int, hop_length: int, win_length: int) -> Tensor:
    """``|STFT|^2`` of ``(B, N)`` waveforms as ``(B, T, n_fft // 2 + 1)``, centred frames."""
    window = torch.hann_window(win_length, dtype=waves.dtype, device=waves.device)
    spec = torch.stft(
        waves,
        n_fft,
        hop_length=hop_length,
        win_length=win_length,
        window=window,
        center=True,
        pad_mode="reflect",
        return_complex=True,
    )
    return (spec.real.square() + spec.imag.square()).transpose(-1, -2)


def hz_to_mel(hz: Tensor) -> Tensor:
    return 2595.0 * torch.log10(1.0 + hz / 700.0)


def mel_to_hz(mel: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(n_freqs: int, sample_rate: int, n_mels: int, f_min: float, f_max: float) -> Tensor:
    """Triangular HTK mel filters ``(n_freqs, n_mels)`` at ``n_freqs`` bins from 0 to Nyquist."""
    freqs = torch.linspace(0.0, sample_rate / 2, n_freqs, dtype=torch.float64)[:, None]
    lo_hi = hz_to_mel(torch.tensor([f_min, f_max], dtype=torch.float64))
    mels = torch.linspace(float(lo_hi[0]), float(lo_hi[1]), n_mels + 2, dtype=torch.float64)
    edges = mel_to_hz(mels)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (freqs - lower) / (centre - lower)
    falling = (upper - freqs) / (upper - centre)
    return torch.minimum(rising, falling).clamp(min=0.0).float()


def power_to_db(power: Tensor, top_db: float | None = None) -> Tensor:
    """``10 log10(max(power, 1e-10))``; with ``top_db``, floored at each clip's peak - top_db."""
    db = 10.0 * torch.log10(power.clamp(min=AMIN))
    if top_db is not None:
        peak = db.amax(dim=(-2, -1), keepdim=True)
        db = torch.maximum(db, peak - top_db)
    return db


def front_end_filterbank(fe: FrontEnd) -> Tensor:
    f_max = fe.target_rate / 2 if fe.f_max is None else fe.f_max
    return mel_filterbank(fe.n_fft // 2 + 1, fe.target_rate, fe.n_mels, fe.f_min, f_max)


def log_mel(waves: Tensor, fe: FrontEnd | None = None) -> Tensor:
    """Features ``(B, n_frames, n_mels)`` float32 of ``(B, N)`` (or ``(N,)``) waveforms at
    ``fe.sample_rate``; a 1-D input gives ``(n_frames, n_mels)``."""
    fe = fe or FrontEnd()
    single = waves.dim() == 1
    x = waves.float().reshape(-1, waves.shape[-1])
    x = pad_or_cut(x, fe.clip_samples)
    x = resample(x, fe.sample_rate, fe.target_rate)
    power = power_spectrogram(x, fe.n_fft, fe.hop_length, fe.win_length)
    mel = power @ front_end_filterbank(fe).to(power)
    db = power_to_db(mel, fe.top_db)
    return db[0] if single else db
