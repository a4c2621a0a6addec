"""Doors translate a wire format into engine calls and decisions back; they hold no rules."""
