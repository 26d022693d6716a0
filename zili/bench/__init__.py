"""`zili bench`: standard training workloads measured on this device, and the side-by-side comparison."""
