"""torch.fx graphs, shared by the export and Dynamo front ends: the GraphView over an fx graph
(``graph``) and the splice that puts fused sites back (``rewrite``)."""
