"""Synthetic preference pairs from judged generations (:mod:`preftune.synth.pairs`)."""
