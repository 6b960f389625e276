"""pear_ray."""
