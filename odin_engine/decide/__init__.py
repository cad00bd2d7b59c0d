"""Decisions on scores: calibration of δ, flagging, evaluation against labelled OOD sets, tuning of (T, ε)."""
