"""Layouts beyond padding (shared prompt, packed rows) register here; see ``preftune.data.collate``."""
