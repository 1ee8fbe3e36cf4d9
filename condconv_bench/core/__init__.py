"""What every strategy codes against: the layer's identity, the contract, and what its work costs.

- `spec`: the identity of a CondConv layer (`LayerSpec`), independent of how it is computed;
- `contract`: the implementation contract (`CondConvBase`): one parameter layout, one routing;
- `registry`: name → implementation, with the verb set register, get, create, list;
- `case`: what a case is (its identity fields, its group, each implementation's `Role`);
- `equivalence`: the float64 oracle and whether two implementations compute the same function;
- `flops`, `traffic`, `limits`: the multiply-adds and bytes of a call, and the least time they can
  take on a machine with given ceilings (pure functions: nothing here times anything).
"""
