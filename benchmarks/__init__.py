"""Side-by-side benchmarks of our proxymap service against Postfix 3.7's C proxymap."""
