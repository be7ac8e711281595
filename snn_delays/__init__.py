"""snn-delays: spiking neural networks with learnable synaptic delays (DCLS)."""

__version__ = "0.1.0"
