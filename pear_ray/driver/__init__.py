"""The driver: plans the work and moves ObjectRefs between the actors; no bulk data passes through it."""
