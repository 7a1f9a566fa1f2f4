"""The torch.export front end: captures a module's forward with dynamic dims (``capture``)."""
