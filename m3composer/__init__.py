"""m3composer: the BGE-M3 fine-tuning recipe on MosaicML Composer and Streaming."""

__version__ = "0.1.0"
