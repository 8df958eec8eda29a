/* State 0x1 at version 1: see livepatch_state.h. */
#define KLP_STATE_VERSION 1
#include "livepatch_state.h"
