"""The Hi-LANDER algorithms as plain functions and torch modules over arrays; no Ray in here."""
