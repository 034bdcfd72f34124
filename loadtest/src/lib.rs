//! Load generator for kefu: open loop (wrk2-style, coordinated-omission-correct) and closed loop (lands with the load-tester issue).
