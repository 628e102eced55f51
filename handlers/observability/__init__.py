"""What the runtime reports: TorchServe metrics and the span recorder (timeline)."""
