"""Ray actors: each wraps one engine from pear_ray.engines behind a narrow, Arrow-in/Arrow-out interface."""
