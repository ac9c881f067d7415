"""Emulated devices. Each owns its state: ``save()`` returns a plain map whose
schema lives in ``vmm.state``; ``restore()`` takes one back."""
