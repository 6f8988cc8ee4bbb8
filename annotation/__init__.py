"""Human semantic correction in Label Studio (push tasks, pull decisions). Not built yet."""
