"""Planning a training run before it costs money: FLOPs, time, cost, memory and disk per stage
(``homediff plan``), and the rehearsal that checks them on real shapes."""
